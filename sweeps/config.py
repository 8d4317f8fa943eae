"""Settings of the sweep engine, read from the environment in one place.

Every setting has the prefix ``L0SWEEP_`` (``L0SWEEP_DATA_DIR``, ``L0SWEEP_MAX_TRIALS``, ...).
The MLflow tracking URI also honours ``MLFLOW_TRACKING_URI``, as MLflow users expect. This class
is the one declaration of each engine setting: the service's settings (`service.settings.Settings`)
extend it, so a setting has one type wherever it is read. A process reads its settings once, at
start-up (the service, the CLI, the driver), and passes them down; :func:`get_settings` remains
for the library's callers that pass none.

``L0SWEEP_HOME`` (default ``~/.l0sweep``) is where a user's l0sweep keeps its state: the embedded
MLflow store that ``l0sweep serve`` and ``l0sweep run`` share (``<home>/mlflow``), Tune's
experiments (``<home>/ray_results``), downloaded data (``<home>/data``) and decoded image folders
(``<home>/cache``), unless ``L0SWEEP_STORAGE_PATH``, ``L0SWEEP_DATA_DIR`` or ``L0SWEEP_CACHE_DIR``
say otherwise.

``L0SWEEP_MLFLOW_RETRY_WINDOW_S`` is how long a sweep rides out an MLflow outage: every request a
driver or a trial makes is retried for that long (``sweeps.retry``) before it fails. The service
passes the setting, with the MLflow client settings that let it govern (:func:`mlflow_client_env`),
to every driver it submits and through the job's runtime environment to every trial on every node.
MLflow's client reads its own settings only from the environment: :func:`configure_mlflow_client`
is the one place that writes them into a process's environment, called once at the start-up of
the service, the CLI and the driver; child processes get them explicitly (:func:`job_env`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "DataDirs",
    "DataPathError",
    "SweepSettings",
    "configure_mlflow_client",
    "get_settings",
    "job_env",
    "mlflow_client_env",
    "resolve_data_path",
    "use_settings",
]


class SweepSettings(BaseSettings):
    """Where data, results and runs live, and the limits that protect a shared lab."""

    model_config = SettingsConfigDict(
        env_prefix="L0SWEEP_", extra="ignore", validate_by_name=True, validate_by_alias=True
    )

    home: Path = Field(
        default_factory=lambda: Path.home() / ".l0sweep",
        description="l0sweep's state: the embedded MLflow store, Tune experiments, data.",
    )
    data_dir: Path | None = Field(
        default=None,  # always a Path once validated (default: under home)
        description="Root of every dataset file a spec names (npz files, downloaded IDX files); "
        "default: <home>/data.",
    )
    fashion_mnist_dir: Path = Field(
        default=Path("/usr/share/datasets/fashion-mnist"),
        description="Fashion-MNIST IDX files (where Debian's dataset-fashion-mnist puts them).",
    )
    mnist_dir: Path | None = Field(
        default=None, description="MNIST IDX files; default: <data_dir>/mnist."
    )
    cache_dir: Path | None = Field(
        default=None,  # always a Path once validated (default: under home)
        description="Decoded image folders, as tensors keyed by the folder's listing, so a "
        "second trial or process does not decode them again; default: <home>/cache.",
    )
    storage_path: Path | None = Field(
        default=None,  # always a Path once validated (default: under home)
        description="Tune experiments, one directory per sweep id; shared by all nodes; "
        "default: <home>/ray_results.",
    )
    tracking_uri: str | None = Field(
        default=None,
        validation_alias=AliasChoices("L0SWEEP_TRACKING_URI", "MLFLOW_TRACKING_URI"),
        description="MLflow tracking URI; None leaves MLflow's own default.",
    )
    max_trials: int = Field(default=512, ge=1, description="Most trials one sweep may expand to.")
    max_epochs: int = Field(default=200, ge=1, description="Most epochs one trial may train.")
    speed_rounds: int = Field(
        default=5,
        ge=1,
        le=100,
        description=(
            "Timing samples per model and batch size when a trial measures the model it exports "
            "(torch, and its ONNX export under ONNX Runtime); the median is logged, and the "
            "l0sweep.speed_rounds tag says how many. Each sample lasts about 20 ms: more give "
            "steadier figures on a busy machine, fewer a cheaper trial."
        ),
    )
    heartbeat_interval_s: float = Field(
        default=30.0,
        gt=0,
        description=(
            "How often a sweep's driver writes its heartbeat (the l0sweep.heartbeat tag of the "
            "parent run): the service ends a local run (`l0sweep run`) whose heartbeat stops."
        ),
    )
    mlflow_retry_window_s: float = Field(
        default=300.0,
        ge=0,
        description=(
            "How long a driver or a trial retries an MLflow request that finds no server (refused, "
            "timed out, 5xx) before it gives up. An outage shorter than this pauses the sweep and "
            "loses nothing; a longer one fails the trials that were waiting, with an error naming "
            "MLflow, its URL and the time waited. 0: no retries."
        ),
    )

    def data_dirs(self) -> DataDirs:
        """Where this process's datasets read their files and cache decoded ones."""
        return DataDirs(
            data_dir=Path(self.data_dir),
            cache_dir=Path(self.cache_dir),
            fashion_mnist_dir=self.fashion_mnist_dir,
            mnist_dir=self.mnist_dir or Path(self.data_dir) / "mnist",
        )

    @model_validator(mode="after")
    def _under_home(self) -> SweepSettings:
        if self.data_dir is None:
            self.data_dir = self.home / "data"
        if self.storage_path is None:
            self.storage_path = self.home / "ray_results"
        if self.cache_dir is None:
            self.cache_dir = self.home / "cache"
        return self


@dataclass(frozen=True)
class DataDirs:
    """The settings a dataset reads (`SweepSettings.data_dirs`), passed to the loaders and part of
    the key of the datasets cached in a process: two data directories never share an entry."""

    data_dir: Path
    cache_dir: Path
    fashion_mnist_dir: Path
    mnist_dir: Path


_in_force: ContextVar[SweepSettings | None] = ContextVar("l0sweep_settings", default=None)


def get_settings() -> SweepSettings:
    """The settings in force: those installed by :func:`use_settings` around the current work
    (the service's, around its requests and background tasks), else the environment read now."""
    return _in_force.get() or SweepSettings()


@contextmanager
def use_settings(settings: SweepSettings) -> Iterator[SweepSettings]:
    """Put ``settings`` in force for the work done inside (and the tasks and threads it starts):
    what a library default reads (:func:`get_settings`: the limits and data directory a spec is
    validated against) is then the caller's settings, never an environment read behind its back."""
    token = _in_force.set(settings)
    try:
        yield settings
    finally:
        _in_force.reset(token)


def mlflow_client_env(retry_window_s: float) -> dict[str, str]:
    """MLflow's client settings for a process that retries MLflow requests for ``retry_window_s``.

    l0sweep retries MLflow requests itself, so MLflow's own retries are down to one, at once
    (urllib3 waits nothing before its first retry): a keep-alive connection that the server drops
    as the request goes out (``Connection reset by peer``, on a loaded machine) is asked again on
    a fresh one instead of counting as an outage, and a stopped server is reported after one more
    refused connection. Left at MLflow's default, each of our attempts against a stopped server
    would itself retry for about four minutes. A request in
    flight may take as long as the window, from 10 s up to MLflow's default of 120 s, so a server
    that hangs instead of refusing is given up on in time. The service, which answers 503 at
    once, is a client with a window of 0 (10 s). MLflow's usage telemetry is off unless the user
    turned it on: labs run l0sweep without internet, and in MLflow 3.17 its client thread sets and
    pops an environment variable that concurrent requests read, which failed a trial's log_batch
    with KeyError '_MLFLOW_TELEMETRY_SESSION_ID'.
    """
    return {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(min(120, max(10, retry_window_s)))),
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


def job_env(retry_window_s: float) -> dict[str, str]:
    """The environment a sweep's driver and its trials are started with (a Ray job's or a local
    Ray's runtime environment): the retry window (``L0SWEEP_MLFLOW_RETRY_WINDOW_S``) and MLflow's
    client settings that let it govern. Passed explicitly to the child processes, never written
    into this process's environment."""
    return {
        "L0SWEEP_MLFLOW_RETRY_WINDOW_S": f"{retry_window_s:g}",
        **mlflow_client_env(retry_window_s),
    }


# How often, at most, Tune saves its experiment state (the trials and their latest checkpoints)
# while a sweep runs. Tune's "auto" saves every 10 s or more, while a trial keeps only its last
# checkpoints (`CheckpointConfig(num_to_keep=...)` in the driver): a trial with epochs shorter than
# that rotated away the checkpoint the saved state named, and a driver killed then and resubmitted
# failed the trial ("Could not recover from checkpoint as it does not exist").
TUNE_STATE_PERIOD_S = 1.0


def configure_tune() -> None:
    """Set Tune's experiment-state period (:data:`TUNE_STATE_PERIOD_S`) in this process's
    environment, where Tune reads it when a sweep starts, unless the user set it: with
    :func:`configure_mlflow_client`, the only writes to the environment, called by the driver."""
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", f"{TUNE_STATE_PERIOD_S:g}")


def configure_mlflow_client(retry_window_s: float) -> None:
    """Set MLflow's client settings (:func:`mlflow_client_env`) in this process's environment,
    where MLflow reads them, unless the user set them: with :func:`configure_tune`, the only writes
    to the environment, called once at the start-up of a process (the service, the CLI, the
    driver)."""
    for key, value in mlflow_client_env(retry_window_s).items():
        os.environ.setdefault(key, value)


class DataPathError(ValueError):
    """A dataset path that is absolute, climbs out of the data directory, or does not exist."""


def resolve_data_path(relative: str, data_dir: Path | None = None) -> Path:
    """Resolve a path named in a spec inside the data directory.

    Args:
        relative: a path relative to the data directory, as written in a spec.
        data_dir: the data directory; default: the ``L0SWEEP_DATA_DIR`` setting.

    Raises:
        DataPathError: the path is absolute, contains ``..``, or resolves (through symlinks)
            outside the data directory.
    """
    root = Path(data_dir if data_dir is not None else get_settings().data_dir)
    candidate = Path(relative)
    if candidate.is_absolute() or relative.startswith("~"):
        raise DataPathError(f"path {relative!r} must be relative to the data directory {root}")
    if "\x00" in relative:  # the OS refuses it with a message that does not name the path
        raise DataPathError(f"path {relative!r} contains a NUL character")
    if ".." in candidate.parts:
        raise DataPathError(f"path {relative!r} must not contain '..'")
    resolved_root = root.resolve()
    resolved = (resolved_root / candidate).resolve()
    if not resolved.is_relative_to(resolved_root):
        raise DataPathError(
            f"path {relative!r} resolves to {resolved}, outside the data directory {resolved_root}"
        )
    return resolved
