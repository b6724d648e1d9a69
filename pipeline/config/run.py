"""One pipeline run's configuration: the stage configs and what the run itself decides."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config.base import check_settings, setting
from pipeline.config.data import AcquireConfig, PreprocessConfig
from pipeline.config.gate import GatePolicy
from pipeline.config.recipes import Recipe, describe
from pipeline.config.settings import Promotion
from pipeline.config.training import TrainConfig, TuneConfig


@dataclass(frozen=True)
class RunConfig:
    """Everything one pipeline run needs, as built from DAG Params or CLI flags
    (:func:`~pipeline.config.params.run_config_from_params`)."""

    acquire: AcquireConfig = field(default_factory=AcquireConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    gate: GatePolicy = field(default_factory=GatePolicy)
    promotion: Promotion = setting(
        "manual",
        title="Promotion",
        help="After the gate and infra validation (alias staging): manual, the run stops at staging and a "
        "person promotes later (promote_model, pipeline promote); approval, the run waits for a person's "
        "Approve or Reject in Airflow (training_pipeline only); auto, production moves to the new version.",
        section="promotion",
    )
    export_variants: bool = setting(
        True,
        title="ONNX and INT8 variants",
        help="After register: export the version to ONNX and INT8 (ONNX Runtime, calibrated on the run's "
        "validation images), score each on the test split against the float model and tag the version; a "
        "variant that fails the gate's variant policy is not served.",
        section="gate",
    )
    recipe: Recipe = setting(
        "default",
        title="Training recipe",
        help="default: the training settings' own defaults, tuned for final accuracy; quick: tuned for time to "
        f"accuracy, for fast iterations ({describe('quick')}). A recipe sets the training settings it names "
        "unless they are given: on the command line, any flag given wins; in the trigger form, a field changed "
        "from its default.",
        section="training",
    )
    force: bool = setting(
        False,
        title="Retrain",
        help="Train and register again even if this data and config were trained before.",
        section="training",
    )

    def __post_init__(self) -> None:
        check_settings(self)

    def train_tags(self, tags: dict[str, str] | None = None) -> dict[str, str]:
        """The MLflow run's tags for the ``train`` stage: the recipe's name, then ``tags`` (a
        launched ``pipeline train`` is given the recipe's values and its name as a tag)."""
        return {"recipe": self.recipe, **(tags or {})}
