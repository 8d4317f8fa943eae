"""l0sweep's sweep engine: Ray Tune trials that train L0-wrapped models, recorded in MLflow.

Light to import: the spec and registries load here; Ray is imported by the driver and the
trainable only. ``service -> sweeps -> l0core``: nothing here imports the service.
"""

from .config import SweepSettings, get_settings
from .registry import list_datasets, list_models
from .spec import SweepSpec, json_schema

__all__ = [
    "SweepSettings",
    "SweepSpec",
    "get_settings",
    "json_schema",
    "list_datasets",
    "list_models",
]
