"""Typed configuration: where things live (:class:`Settings`) and how each stage behaves.

``Settings`` is read from the environment, standard variable names first
(``MLFLOW_TRACKING_URI``, ``AWS_ENDPOINT_URL``), so the same code runs embedded on one machine
and against real services. Stage configs are plain dataclasses whose fields are documented and
checked in ``__post_init__``. Each user-facing field carries its one definition (a
:class:`Setting`: title, help, section, bounds; choices are its ``Literal`` type), from which
:mod:`pipeline.config.params` generates the DAG Params and CLI flags, and converts their values
back (:func:`run_config_from_params`, the one place where that happens).
"""

from pipeline.config.base import SECTIONS, Setting, fingerprint
from pipeline.config.data import AcquireConfig, PreprocessConfig, SourceLimits
from pipeline.config.gate import GatePolicy
from pipeline.config.params import RunParam, run_config_from_params, run_params
from pipeline.config.run import RunConfig
from pipeline.config.serving import ServingSettings
from pipeline.config.settings import (
    ACCELERATORS,
    ARCHITECTURES,
    DEBIAN_FASHION_MNIST,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_LABEL_DIGESTS,
    FASHION_MNIST_SHAPE,
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
    "FASHION_MNIST_LABEL_DIGESTS",
    "FASHION_MNIST_SHAPE",
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
    "RunParam",
    "SECTIONS",
    "Setting",
    "ServingSettings",
    "Settings",
    "SourceLimits",
    "TrainConfig",
    "TuneConfig",
    "fingerprint",
    "project_root",
    "run_config_from_params",
    "run_params",
]
