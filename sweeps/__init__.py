"""l0sweep's sweep engine: Ray Tune trials that train L0-wrapped models, recorded in MLflow.

Light to import: the spec and registries load here; Ray is imported by the driver and the
trainable only. ``service -> sweeps -> l0core``: nothing here imports the service.
"""

import os

# MLflow's usage telemetry off unless the user turns it on: labs run l0sweep without internet,
# and in MLflow 3.17 its client thread sets and pops an environment variable that concurrent
# requests read, which failed a trial's log_batch with KeyError '_MLFLOW_TELEMETRY_SESSION_ID'.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

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
