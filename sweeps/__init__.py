"""l0sweep's sweep engine: Ray Tune trials that train L0-wrapped models, recorded in MLflow.

Light to import: the names below load on first use (PEP 562), so that a light module of this
package (``sweeps.vocabulary``, which the service's client and schemas use) does not pull in
torch through the spec. Ray is imported by the driver and the trainable only.
``service -> sweeps -> l0core``: nothing here imports the service.
"""

import os
from importlib import import_module
from typing import Any

# MLflow's usage telemetry off unless the user turns it on: labs run l0sweep without internet,
# and in MLflow 3.17 its client thread sets and pops an environment variable that concurrent
# requests read, which failed a trial's log_batch with KeyError '_MLFLOW_TELEMETRY_SESSION_ID'.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# Each public name and the module that defines it.
_EXPORTS = {
    "SweepSettings": "config",
    "get_settings": "config",
    "list_datasets": "registry",
    "list_models": "registry",
    "SweepSpec": "spec",
    "json_schema": "spec",
}

__all__ = [
    "SweepSettings",
    "SweepSpec",
    "get_settings",
    "json_schema",
    "list_datasets",
    "list_models",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
