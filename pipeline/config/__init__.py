"""Typed configuration: where things live (:class:`Settings`) and how each stage behaves.

``Settings`` is read from the environment, standard variable names first
(``MLFLOW_TRACKING_URI``, ``AWS_ENDPOINT_URL``), so the same code runs embedded on one machine
and against real services. Stage configs are plain dataclasses whose fields are documented and
checked in ``__post_init__``; Airflow ``Param``s and CLI flags are turned into them by
:func:`run_config_from_params`, the one place where that conversion happens.
"""

from pipeline.config.base import fingerprint
from pipeline.config.data import AcquireConfig, PreprocessConfig, SourceLimits
from pipeline.config.gate import GatePolicy
from pipeline.config.run import RunConfig, run_config_from_params
from pipeline.config.serving import ServingSettings
from pipeline.config.settings import (
    ACCELERATORS,
    ARCHITECTURES,
    DEBIAN_FASHION_MNIST,
    FASHION_MNIST_CLASSES,
    IDX_FILES,
    LR_SCHEDULES,
    OPTIMIZERS,
    PRECISIONS,
    REFERENCE_BATCH,
    STRATEGIES,
    Settings,
    project_root,
)
from pipeline.config.training import TUNABLE, TrainConfig, TuneConfig

__all__ = [
    "ACCELERATORS",
    "ARCHITECTURES",
    "DEBIAN_FASHION_MNIST",
    "FASHION_MNIST_CLASSES",
    "IDX_FILES",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "PRECISIONS",
    "REFERENCE_BATCH",
    "STRATEGIES",
    "TUNABLE",
    "AcquireConfig",
    "GatePolicy",
    "PreprocessConfig",
    "RunConfig",
    "ServingSettings",
    "Settings",
    "SourceLimits",
    "TrainConfig",
    "TuneConfig",
    "fingerprint",
    "project_root",
    "run_config_from_params",
]
