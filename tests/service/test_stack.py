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

from service.stack import (
    ManagedProcess,
    _dashboard_session,
    free_port,
    running_mlflow,
    wait_for_http,
)

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
        # The banner's last address line (an error can name the Ray dashboard too).
        while not re.search(r"^Ray dashboard\s+\S+$", text := log.read_text(), re.MULTILINE):
            assert serve.poll() is None and time.monotonic() < deadline, text
            time.sleep(0.5)
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


# A dashboard stub: answers /api/version with an empty body, then an HTML page, then (unless told
# "never") JSON with a session name, for ever.
_STARTING_DASHBOARD = """
import http.server, json, sys
answers = [b"", b"<html>starting</html>"]
if sys.argv[2] != "never":
    answers.append(json.dumps({"session_name": "session_1"}).encode())
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = answers.pop(0) if len(answers) > 1 else answers[0]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


@pytest.mark.parametrize("answers", ["starting", "never"])
def test_a_dashboard_that_answers_before_it_is_ready_is_asked_again(tmp_path, answers) -> None:
    """A Ray dashboard still starting on a loaded machine answered ``/api/version`` with an empty
    body, and ``l0sweep serve`` exited with ``error: Expecting value: line 1 column 1``."""
    port = free_port()
    argv = [sys.executable, "-c", _STARTING_DASHBOARD, str(port), answers]
    stub = ManagedProcess("dashboard stub", argv, tmp_path / "stub.log").start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/up", stub, 30, accept=frozenset({200}))  # takes the empty body
        if answers == "starting":
            assert _dashboard_session(url, stub, time.monotonic() + 30) == "session_1"
        else:  # a clear error naming the last answer, at the deadline
            with pytest.raises(RuntimeError, match=r"gave no session name \(last answer: 200 "):
                _dashboard_session(url, stub, time.monotonic() + 2)
    finally:
        stub.stop()
