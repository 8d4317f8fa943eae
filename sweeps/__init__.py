"""l0sweep's sweep engine: Ray Tune trials that train L0-wrapped models, recorded in MLflow.

Light to import: the names below load on first use (PEP 562), so that a light module of this
package (``sweeps.vocabulary``, which the service's client and schemas use) does not pull in
torch through the spec. Ray is imported by the driver and the trainable only. Importing the
package has no side effect: no plugin is loaded (the service, the CLI and the driver load them at
start-up, :func:`sweeps.registry.load_builtins`) and no environment variable is set (MLflow's
client settings: :func:`sweeps.config.configure_mlflow_client`, at the same start-ups).
``service -> sweeps -> l0core``: nothing here imports the service.
"""

from importlib import import_module
from typing import Any

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
