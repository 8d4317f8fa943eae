"""Service settings: the engine's settings (`sweeps.config.SweepSettings`) and the service's own,
read once from the environment (prefix ``L0SWEEP_``), one type per setting."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from sweeps.config import SweepSettings

__all__ = ["Settings", "is_loopback"]


class Settings(SweepSettings):
    """Everything the service and `l0sweep serve` can be told: the engine's settings (``home``,
    ``tracking_uri``, ``storage_path``, the limits a spec is validated against, ...; declared once,
    in `sweeps.config.SweepSettings`) and the service's own.

    ``ray_address`` and ``tracking_uri`` left unset mean "start an embedded one" to `l0sweep serve`;
    the app itself needs both (``create_app`` refuses to start without them). The service hands
    ``mlflow_retry_window_s`` to every job it submits (its runtime environment), so that drivers
    and trials on every node ride out an MLflow outage for as long as the service's settings say.
    """

    model_config = SettingsConfigDict(
        env_prefix="L0SWEEP_", extra="ignore", validate_by_name=True, validate_by_alias=True
    )

    host: str = Field("127.0.0.1", description="Address the API binds to.")
    port: int = Field(8000, ge=0, le=65535, description="Port the API binds to.")
    token: SecretStr | None = Field(
        None, description="Bearer token required on every endpoint but /healthz."
    )
    ray_address: str | None = Field(
        None, description="Ray dashboard / job-submission URL, e.g. http://head:8265."
    )
    mlflow_ui_url: str | None = Field(
        None, description="Base URL of the MLflow UI for links (default: tracking_uri if http)."
    )
    ray_dashboard_url: str | None = Field(
        None, description="Base URL of the Ray dashboard for links (default: ray_address)."
    )
    ray_num_cpus: int | None = Field(None, ge=1, description="CPUs of an embedded Ray head.")
    max_concurrent_sweeps: int = Field(4, ge=1, description="Active sweeps before POST gets 429.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body (413).")
    refresh_interval_s: float = Field(2.0, gt=0, description="How often the sweep cache refreshes.")
    refresh_backoff: float = Field(
        5.0,
        ge=1.0,
        description="While nothing changes the refresh interval doubles, up to this many times "
        "refresh_interval_s (1: never).",
    )
    finished_cache_size: int = Field(
        32, ge=1, description="Finished sweeps whose trials stay in memory after being read."
    )
    reconcile_interval_s: float = Field(10.0, gt=0, description="How often jobs are reconciled.")
    stop_grace_s: int = Field(60, ge=1, description="SIGTERM grace before Ray kills a driver.")
    max_resubmits: int = Field(3, ge=0, description="Driver resubmissions before a sweep FAILS.")
    backend_timeout_s: float = Field(5.0, gt=0, description="Timeout of health probes.")
    driver_python: str = Field(sys.executable, description="Python that runs the sweeps driver.")

    local_run_timeout_s: float = Field(
        300.0,
        gt=0,
        description="A local run (`l0sweep run`) whose heartbeat is older than this is ended "
        "FAILED by the reconciliation, and can be cancelled (marked ended) through the API.",
    )

    def resolved_storage_path(self) -> str:
        """The Tune storage path, absolute (``L0SWEEP_STORAGE_PATH``, else ``<home>/ray_results``)."""
        return str(Path(self.storage_path).expanduser().resolve())

    def mlflow_ui_base(self) -> str | None:
        """Base URL for links into the MLflow UI, or None when the store has no UI."""
        if self.mlflow_ui_url:
            return self.mlflow_ui_url.rstrip("/")
        if self.tracking_uri and self.tracking_uri.startswith(("http://", "https://")):
            return self.tracking_uri.rstrip("/")
        return None

    def check_bind(self) -> None:
        """Refuse to expose the API beyond loopback without a token.

        Raises:
            ValueError: ``host`` is not a loopback address and no token is configured.
        """
        if self.token is None and not is_loopback(self.host):
            raise ValueError(
                f"refusing to serve on non-loopback address {self.host!r} without a token: "
                "set L0SWEEP_TOKEN (or bind to 127.0.0.1)"
            )


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
