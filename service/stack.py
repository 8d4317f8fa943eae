"""`l0sweep serve`: Ray, MLflow and the API on one machine, with one command.

Whatever the settings do not point at is started here as a child process: a Ray head with its
dashboard (``ray start --head --block``), an MLflow server with a SQLite store and local artifacts
under ``Settings.home`` (its job runner off: about 0.3 GB resident instead of 2.1 GB), then the
API under uvicorn. The children run in their own process groups, so a Ctrl-C reaches the API
only, and the stack then stops MLflow and Ray in order (Ray drains gracefully on SIGTERM).

The embedded MLflow store (``<home>/mlflow``, :func:`mlflow_home`) is shared with ``l0sweep run``:
while ``l0sweep serve`` runs, its server's address is in ``<home>/mlflow/server.json`` and a local
run records through it; otherwise the run starts a server of its own on the same store for as long
as it runs (:func:`embedded_mlflow`). Every process of a sweep then writes through one server,
and a later ``l0sweep serve`` shows the runs with their artifacts.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from service.settings import Settings, is_loopback
from sweeps import raycompat

__all__ = [
    "EmbeddedStack",
    "ManagedProcess",
    "embedded_mlflow",
    "ephemeral_port_range",
    "free_port",
    "mlflow_home",
    "running_mlflow",
    "start_mlflow",
    "start_ray_head",
]

logger = logging.getLogger(__name__)


@dataclass
class ManagedProcess:
    """A child process in its own process group, logging to a file."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    # Inherited variables the process must not see (a secret it has no use for).
    drop_env: tuple[str, ...] = ()
    popen: subprocess.Popen | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**_child_environ(self.drop_env), **self.env},
                start_new_session=True,
            )
        logger.info("started %s (pid %d), log %s", self.name, self.popen.pid, self.log_path)
        return self

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout_s: float = 40.0) -> None:
        """SIGTERM, then SIGKILL to the whole group if it has not exited within ``timeout_s``."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within %.0f s; killing it", self.name, timeout_s)
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)
        logger.info("stopped %s", self.name)


def _child_environ(drop: tuple[str, ...] = ()) -> dict[str, str]:
    """This process's environment without the API token (and ``drop``): Ray and MLflow (and
    through Ray every driver and trial) inherit it, and none of them needs the token."""
    return {k: v for k, v in os.environ.items() if k != "L0SWEEP_TOKEN" and k not in drop}


# Ports handed out by free_port(): above Ray's worker ports (10002-19999 by default) and below the
# range the kernel takes ports from for outgoing connections and bind(0) (see ephemeral_port_range).
# A port from bind(0) is closed again before the server that gets it binds it, and on a busy
# machine an outgoing connection of any process can take it in between; a Ray head started with
# seven such ports then lost one now and then.
_PORTS_FROM = 20000
_random = random.SystemRandom()  # not the seeded module RNG: two test workers would pick alike


def free_port(preferred: int | None = None, host: str = "127.0.0.1") -> int:
    """``preferred`` if nothing listens on it, else a free port that the kernel does not hand out
    to outgoing connections (a free one chosen by the OS where that range is unknown)."""
    if preferred:
        with socket.socket() as sock:
            if sock.connect_ex((host, preferred)) != 0:
                return preferred
    low = ephemeral_port_range()[0]
    for _ in range(100 if low > _PORTS_FROM + 1000 else 0):
        port = _random.randrange(_PORTS_FROM, low)
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections and bind(0) (Linux; IANA's elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 49152, 65535


def wait_for_http(
    url: str, process: ManagedProcess, timeout_s: float, accept: frozenset[int] = frozenset({200})
) -> None:
    """Poll ``url`` until it answers with a status in ``accept``.

    Raises:
        RuntimeError: the process exited or the URL did not answer within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process.running:
            raise RuntimeError(f"{process.name} exited while starting; see {process.log_path}")
        try:
            if httpx.get(url, timeout=2.0).status_code in accept:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(
        f"{process.name} did not answer at {url} in {timeout_s:.0f} s; see {process.log_path}"
    )


def _tool(name: str) -> str:
    """An executable installed next to this interpreter (the venv's ray, mlflow)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _ray_token_present() -> bool:
    """Whether Ray finds a token: ``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH``
    names, else ``~/.ray/auth_token`` (Ray's order; an empty one is no token)."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return True
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(named).expanduser() if named else Path.home() / ".ray" / "auth_token"
    try:
        return bool(path.read_text().strip())
    except (OSError, UnicodeDecodeError):
        return False


def ensure_ray_token() -> None:
    """Create Ray's auth token (``ray get-auth-token --generate``) unless one is already there.

    Ray reads ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``; the CLI
    generates the last only when none of them holds a token, so an existing token is kept. A
    token found here skips the CLI (a second of CPU at every start of a Ray head).
    """
    if _ray_token_present():
        return
    done = subprocess.run(
        [_tool("ray"), "get-auth-token", "--generate"],
        capture_output=True,
        text=True,
        env={**_child_environ(), "RAY_AUTH_MODE": "token"},
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"could not create a Ray auth token: {done.stderr.strip()[-500:]}")


def start_ray_head(
    log_dir: Path,
    num_cpus: int | None = None,
    dashboard_port: int = 8265,
    timeout_s: float = 120,
    temp_dir: str | None = None,
    env: dict[str, str] | None = None,
) -> tuple[ManagedProcess, str]:
    """Start a local Ray head with its dashboard; returns it and the dashboard (jobs) URL.

    ``env`` is added to the head's environment (and so to every driver and trial it starts).

    Every port Ray would take by default gets a free one, so the head can run beside other Ray
    clusters on the machine. Ray's session files go under a short /tmp directory (Unix socket
    paths are limited to about 100 characters).
    """
    temp_dir = temp_dir or tempfile.mkdtemp(prefix="l0sweep-ray-")
    dashboard = free_port(dashboard_port)
    argv = [
        _tool("ray"),
        "start",
        "--head",
        "--block",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
        f"--port={free_port()}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]
    if num_cpus is not None:
        argv.append(f"--num-cpus={num_cpus}")
    # Token authentication on unless the user chose otherwise. `ray start` refuses to start a head
    # in token mode without a token, so a fresh machine gets one first (~/.ray/auth_token).
    env = {**(env or {}), "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    if env["RAY_AUTH_MODE"] == "token":
        ensure_ray_token()
    process = ManagedProcess("Ray head", argv, log_dir / "ray.log", env).start()
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + timeout_s
    try:
        wait_for_http(f"{url}/api/version", process, timeout_s, accept=frozenset({200, 401}))
        raycompat.enable_token_auth()
        # The port was free when chosen; make sure the dashboard answering is this head's.
        session = _dashboard_session(url, process, deadline)
        if not (Path(temp_dir) / session).is_dir():
            raise RuntimeError(f"another Ray cluster answers at {url}; see {process.log_path}")
    except (RuntimeError, httpx.HTTPError) as err:
        process.stop()
        raise RuntimeError(f"{err}{_dashboard_log_tail(Path(temp_dir))}") from err
    return process, url


def _dashboard_log_tail(temp_dir: Path, lines: int = 15) -> str:
    """The end of the Ray dashboard's own logs of the session under ``temp_dir`` (they say why a
    dashboard that does not answer stopped, or never bound its port), for a start-up error."""
    parts = []
    for log in sorted(temp_dir.glob("session_*/logs/dashboard.*")):
        if log.suffix in (".log", ".err", ".out") and not log.parent.parent.is_symlink():
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            if tail:
                parts.append(f"\n--- {log} (end) ---\n" + "\n".join(tail))
    return "".join(parts)


def _dashboard_session(url: str, process: ManagedProcess, deadline: float) -> str:
    """The session name the dashboard at ``url`` reports, asked until it answers with one: a
    dashboard still starting (on a loaded machine) may answer ``/api/version`` with an empty or
    non-JSON body first."""
    answer = ""
    while True:
        try:
            response = httpx.get(f"{url}/api/version", headers=raycompat.auth_headers(), timeout=5)
        except httpx.HTTPError as exc:
            answer = f"{type(exc).__name__}: {exc}"
        else:
            answer = f"{response.status_code} {response.text[:200]!r}"
            try:
                version = response.json() if response.is_success else None
            except ValueError:
                version = None
            if isinstance(version, dict) and version.get("session_name"):
                return str(version["session_name"])
        if not process.running:
            raise RuntimeError(f"{process.name} exited while starting; see {process.log_path}")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the Ray dashboard at {url} gave no session name (last answer: {answer}); "
                f"see {process.log_path}"
            )
        time.sleep(0.5)


def start_mlflow(
    home: Path, port: int = 5000, workers: int = 1, timeout_s: float = 120
) -> tuple[ManagedProcess, str]:
    """Start an MLflow server (SQLite store, local artifacts under ``home``); returns it and its URI."""
    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    port = free_port(port)
    argv = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{home / 'mlflow.db'}",
        "--artifacts-destination",
        str(home / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    # Nor does it need Ray's token.
    process = ManagedProcess(
        "MLflow server", argv, home / "mlflow.log", env, drop_env=("RAY_AUTH_TOKEN",)
    ).start()
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{uri}/health", process, timeout_s)
    except RuntimeError:
        process.stop()
        raise
    return process, uri


_SERVER_FILE = "server.json"


def mlflow_home(home: Path) -> Path:
    """The embedded MLflow store under ``home``: SQLite database, artifacts, log, server.json."""
    return home.expanduser().resolve() / "mlflow"


def _advertise(store: Path, process: ManagedProcess, uri: str) -> None:
    """Say in ``store`` which server serves it, for ``l0sweep run`` to record through."""
    assert process.popen is not None
    (store / _SERVER_FILE).write_text(json.dumps({"uri": uri, "pid": process.popen.pid}))


def running_mlflow(store: Path) -> str | None:
    """The URI of the live server ``l0sweep serve`` runs on ``store``, if there is one."""
    try:
        info = json.loads((store / _SERVER_FILE).read_text())
        os.kill(int(info["pid"]), 0)  # a file left by a server that died names no server
        uri = str(info["uri"])
        return uri if httpx.get(f"{uri}/health", timeout=2).status_code == 200 else None
    except (OSError, ValueError, KeyError, TypeError, httpx.HTTPError):
        return None


@contextmanager
def embedded_mlflow(store: Path, timeout_s: float = 120) -> Iterator[tuple[str, bool]]:
    """The MLflow server of the embedded ``store`` for the block: the one ``l0sweep serve`` runs
    on it, else one started now (on a free port) and stopped when the block ends.

    Yields:
        The server's URI, and whether it is shared (``l0sweep serve``'s, whose UI stays up).
    """
    uri = running_mlflow(store)
    if uri is not None:
        yield uri, True
        return
    process, uri = start_mlflow(store, port=free_port(), timeout_s=timeout_s)
    try:
        yield uri, False
    finally:
        process.stop()


class EmbeddedStack:
    """Start what ``settings`` leaves unset; ``with EmbeddedStack(s) as ready:`` gives the settings
    with ``ray_address`` and ``tracking_uri`` filled in, and stops the started processes on exit.
    """

    def __init__(self, settings: Settings, ray_temp_dir: str | None = None) -> None:
        self.settings = settings
        self.ray_temp_dir = ray_temp_dir
        self.processes: list[ManagedProcess] = []
        self.advertised: Path | None = None

    def __enter__(self) -> Settings:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> Settings:
        settings = self.settings
        home = settings.home.expanduser()
        update: dict[str, str] = {}
        if not settings.tracking_uri:
            if settings.ray_address and not is_loopback(
                urlsplit(settings.ray_address).hostname or ""
            ):
                logger.warning(
                    "joining the Ray cluster at %s with an embedded MLflow on 127.0.0.1: trials on "
                    "other nodes cannot reach it; pass --mlflow-uri with a server every node reaches",
                    settings.ray_address,
                )
            store = mlflow_home(home)
            process, uri = start_mlflow(store)
            self.processes.append(process)
            _advertise(store, process, uri)
            self.advertised = store / _SERVER_FILE
            update["tracking_uri"] = uri
        if not settings.ray_address:
            # The drivers and trials of this head keep their state under the same home.
            process, url = start_ray_head(
                home / "logs",
                num_cpus=settings.ray_num_cpus,
                temp_dir=self.ray_temp_dir,
                env={"L0SWEEP_HOME": str(home.resolve())},
            )
            self.processes.append(process)
            update["ray_address"] = url
        return settings.model_copy(update=update)

    def stop(self) -> None:
        """Stop the started processes, the last started first."""
        if self.advertised is not None:
            self.advertised.unlink(missing_ok=True)
            self.advertised = None
        while self.processes:
            self.processes.pop().stop()
