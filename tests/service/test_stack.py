"""`l0sweep serve` with nothing configured: Ray, MLflow and the API start; Ctrl-C (SIGINT) or a
SIGTERM (`docker stop`, systemd, `timeout`) stops them all."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from service.stack import free_port, running_mlflow

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize(
    ("stop_signal", "exit_code"), [(signal.SIGINT, 0), (signal.SIGTERM, 128 + signal.SIGTERM)]
)
def test_serve_starts_and_stops_the_whole_stack(tmp_path, stop_signal, exit_code) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("L0SWEEP_", "MLFLOW_"))}
    argv = [sys.executable, "-m", "service.cli", "serve", "--home", str(tmp_path),
            "--port", str(port), "--num-cpus", "1"]  # fmt: skip
    log = tmp_path / "serve.log"
    ray_dirs = set(Path(tempfile.gettempdir()).glob("l0sweep-ray-*"))
    with open(log, "wb") as out:
        serve = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while "Ray dashboard" not in log.read_text():
            assert serve.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        text = log.read_text()
        api = re.search(r"l0sweep API\s+(\S+)", text).group(1)
        mlflow = re.search(r"MLflow UI\s+(\S+)", text).group(1)
        ray = re.search(r"Ray dashboard\s+(\S+)", text).group(1)
        assert api == f"http://127.0.0.1:{port}"
        while True:
            try:
                health = httpx.get(f"{api}/healthz", timeout=5)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.5)
        assert health.status_code == 200, health.text
        assert health.json()["mlflow"]["url"] == mlflow
        assert health.json()["ray"]["url"] == ray
        assert (tmp_path / "mlflow" / "mlflow.db").exists()
        # `l0sweep run` on this home records through this server
        assert running_mlflow(tmp_path / "mlflow") == mlflow

        serve.send_signal(stop_signal)
        assert serve.wait(90) == exit_code, log.read_text()
        for url in (api, mlflow, ray):
            with pytest.raises(httpx.HTTPError):
                httpx.get(url, timeout=2)
        assert not (tmp_path / "mlflow" / "server.json").exists()
        assert running_mlflow(tmp_path / "mlflow") is None
    finally:
        if serve.poll() is None:
            serve.kill()
        for new in set(Path(tempfile.gettempdir()).glob("l0sweep-ray-*")) - ray_dirs:
            shutil.rmtree(new, ignore_errors=True)
