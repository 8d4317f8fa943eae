"""Settings and bind safety, without any back end."""

from __future__ import annotations

import pytest

from service.app import create_app
from service.settings import Settings, is_loopback


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("localhost", True), ("::1", True), ("127.0.0.5", True),
     ("0.0.0.0", False), ("192.168.1.4", False), ("example.org", False)],
)  # fmt: skip
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_non_loopback_bind_without_token_is_refused() -> None:
    with pytest.raises(ValueError, match="without a token"):
        Settings(host="0.0.0.0").check_bind()
    Settings(host="0.0.0.0", token="s3cret").check_bind()
    Settings(host="127.0.0.1").check_bind()


def test_app_needs_ray_and_mlflow() -> None:
    with pytest.raises(ValueError, match="L0SWEEP_RAY_ADDRESS"):
        create_app(Settings(ray_address=None, tracking_uri=None))


def test_env_prefix_and_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("L0SWEEP_TOKEN", "s3cret")
    monkeypatch.setenv("L0SWEEP_MAX_CONCURRENT_SWEEPS", "7")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    settings = Settings()
    assert settings.max_concurrent_sweeps == 7
    assert settings.tracking_uri == "http://127.0.0.1:5999"
    assert "s3cret" not in repr(settings)
    assert settings.token.get_secret_value() == "s3cret"


def test_cli_serve_refuses_public_bind(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from service.cli import main

    monkeypatch.delenv("L0SWEEP_TOKEN", raising=False)
    assert (
        main(
            ["serve", "--host", "0.0.0.0", "--ray-address", "http://x", "--mlflow-uri", "http://y"]
        )
        == 2
    )
    assert "without a token" in capsys.readouterr().err


def test_job_links_use_the_public_dashboard_url(monkeypatch) -> None:
    from service.jobs import JobRunner

    def runner(**kw) -> JobRunner:
        return JobRunner("http://ray-head:8265", python="python", tracking_uri="http://mlflow:5000",
                         storage_path="/shared/ray", **kw)  # fmt: skip

    assert runner().dashboard_url("j1") == "http://ray-head:8265/#/jobs/j1"
    public = runner(dashboard="http://lab.example:8265/")
    assert public.dashboard_url("j1") == "http://lab.example:8265/#/jobs/j1"
    assert public.dashboard_url(None) is None
    monkeypatch.setenv("L0SWEEP_RAY_DASHBOARD_URL", "http://lab.example:8265")
    assert Settings().ray_dashboard_url == "http://lab.example:8265"


def test_home_moves_the_tune_storage_and_the_data_unless_they_are_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    from sweeps.config import get_settings

    for name in ("L0SWEEP_STORAGE_PATH", "L0SWEEP_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("L0SWEEP_HOME", str(tmp_path / "home"))
    sweep = get_settings()
    assert sweep.storage_path == tmp_path / "home" / "ray_results"
    assert sweep.data_dir == tmp_path / "home" / "data"
    assert Settings().resolved_storage_path() == str(tmp_path / "home" / "ray_results")
    # `l0sweep serve --home` (a field, not the environment) moves it too
    assert Settings(home=tmp_path / "other").resolved_storage_path() == str(
        tmp_path / "other" / "ray_results"
    )
    monkeypatch.setenv("L0SWEEP_STORAGE_PATH", str(tmp_path / "shared"))
    assert get_settings().storage_path == tmp_path / "shared"
    assert Settings(home=tmp_path / "other").resolved_storage_path() == str(tmp_path / "shared")


def test_a_relative_tracking_uri_is_made_absolute_for_every_process(tmp_path, monkeypatch) -> None:
    from sweeps.tracking import absolute_uri

    monkeypatch.chdir(tmp_path)
    assert absolute_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    assert absolute_uri("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"
    assert absolute_uri("mlruns") == str(tmp_path / "mlruns")
    assert absolute_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert absolute_uri(None).startswith("sqlite:////")  # MLflow's default, made absolute
