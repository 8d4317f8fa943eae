"""A keep-alive connection that the MLflow server drops as a request goes out is not an outage.

On a loaded machine a server closes an idle pooled connection just as the client reuses it, and
the request fails with ``Connection reset by peer``. With MLflow's own HTTP retries off, the
service answered 503 for it (``MLflow is unavailable: could not read sweep``) and a test's poll
failed. MLflow's client settings allow one retry, at once: the request goes out again on a fresh
connection, and a stopped server is still reported after one more refused connection.
"""

from __future__ import annotations

import json
import socket
import struct
import threading

import pytest
from mlflow.exceptions import MlflowException

from sweeps import tracking
from sweeps.config import mlflow_client_env

_EXPERIMENT = {
    "experiment": {
        "experiment_id": "0", "name": "Default", "artifact_location": "/tmp/x",
        "lifecycle_stage": "active",
    }
}  # fmt: skip


class _DropsFirstRequest:
    """A one-connection-at-a-time HTTP server: resets the first connection once the request
    arrived (SO_LINGER 0: an RST, as a server closing the socket under the client), then answers
    every later request with an MLflow experiment."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.uri = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    self.requests += 1
                    if self.requests == 1:
                        conn.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                        break
                    body = json.dumps(_EXPERIMENT).encode()
                    head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    head += f"Content-Length: {len(body)}\r\n\r\n"
                    conn.sendall(head.encode() + body)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def client_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's client settings as the service has them (a retry window of 0)."""
    for key, value in mlflow_client_env(0.0).items():
        monkeypatch.setenv(key, value)


@pytest.mark.fast
def test_a_dropped_connection_is_asked_again_at_once(client_env) -> None:
    server = _DropsFirstRequest()
    try:
        with tracking.retry_window(0):
            experiment = tracking.client(server.uri).get_experiment("0")
    finally:
        server.close()
    assert experiment.name == "Default"
    assert server.requests == 2


@pytest.mark.fast
def test_a_stopped_server_still_fails_at_once(client_env) -> None:
    sock = socket.create_server(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    with tracking.retry_window(0), pytest.raises(MlflowException, match="Connection refused"):
        tracking.client(dead).get_experiment("0")
