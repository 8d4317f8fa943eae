"""A real Docker engine for the lab cluster's test.

The engine is one that already answers (``DOCKER_HOST`` or the default socket) or, as root, a
private ``dockerd`` started here with its own socket and exec root, and its data root under
the cache directory (``L0SWEEP_DOCKER_CACHE``, default ``/var/cache/l0sweep-docker``, outside
any clone): images and BuildKit's cache survive between runs, which is what makes a warm run
quick. A lock file in the cache keeps two runs from sharing one data root at once. The images
it runs are made by tests/docker/build.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("L0SWEEP_DOCKER_CACHE", "/var/cache/l0sweep-docker"))

# Compose projects of these tests are named with this prefix (stale ones are removed).
PROJECT_PREFIX = "l0t-"

ENGINE_START_TIMEOUT_S = 90
LOCK_TIMEOUT_S = 1200


class EngineUnavailable(Exception):
    """No Docker engine can be had here (the test is skipped with this reason)."""


@dataclass
class Engine:
    """A Docker engine and the clients that talk to it."""

    docker: str
    compose: list[str]
    host: str
    log: Path | None = None
    config_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="l0t-cfg-")))

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a docker or compose command: this engine, our own client config,
        none of the caller's compose settings."""
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("DOCKER_", "COMPOSE_", "L0SWEEP_", "RAY_", "POSTGRES_"))
        }
        return {
            **base,
            "DOCKER_HOST": self.host,
            "DOCKER_CONFIG": str(self.config_dir),
            "DOCKER_BUILDKIT": "1",
            **extra,
        }

    def run(
        self,
        argv: list[str],
        timeout_s: float = 120,
        check: bool = True,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess:
        """Run a docker or compose command; a failure or a timeout says which and shows its
        output and the engine's log."""
        try:
            done = subprocess.run(
                argv,
                env=env or self.env(),
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(
                f"{' '.join(argv)}: no answer within {timeout_s:.0f} s\n"
                f"{_text(exc.stdout)[-3000:]}\n{_text(exc.stderr)[-3000:]}\n{self.log_tail()}"
            ) from None
        if check and done.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {done.returncode}\n{done.stdout[-3000:]}\n"
                f"{done.stderr[-5000:]}\n{self.log_tail()}"
            )
        return done

    def docker_cmd(self, *args: str, timeout_s: float = 120, check: bool = True):
        return self.run([self.docker, *args], timeout_s=timeout_s, check=check)

    def has_image(self, name: str) -> bool:
        return self.docker_cmd("image", "inspect", name, check=False).returncode == 0

    def log_tail(self, lines: int = 30) -> str:
        if self.log is None or not self.log.exists():
            return ""
        text = self.log.read_text(errors="replace").splitlines()[-lines:]
        return f"--- dockerd ({self.log}) ---\n" + "\n".join(text)

    def remove_stale_projects(self) -> None:
        """Containers, volumes and networks of earlier runs' projects (a run killed before its
        teardown); their restart policy would otherwise bring them back with the engine."""
        label = "label=com.docker.compose.project"
        for kind, listing in (
            ("container", ["ps", "-a", "--filter", label, "--format", "{{.ID}} {{.Labels}}"]),
            ("volume", ["volume", "ls", "--filter", label, "--format", "{{.Name}} {{.Labels}}"]),
            ("network", ["network", "ls", "--filter", label, "--format", "{{.ID}} {{.Labels}}"]),
        ):
            stale = [
                line.split()[0]
                for line in self.docker_cmd(*listing).stdout.splitlines()
                if f"com.docker.compose.project={PROJECT_PREFIX}" in line
            ]
            if stale:
                remove = ["rm", "-f", "-v"] if kind == "container" else [kind, "rm", "-f"]
                self.docker_cmd(*remove, *stale, timeout_s=300)


def _text(value: str | bytes | None) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value or ""


# --- the engine ---------------------------------------------------------------------------------


def docker_client() -> str | None:
    """Debian's docker client (it has BuildKit built in), else whichever is on PATH."""
    debian = Path("/usr/bin/docker")
    return str(debian) if debian.is_file() else shutil.which("docker")


def _answers(docker: str, host: str) -> bool:
    try:
        done = subprocess.run(
            [docker, "info", "--format", "{{.ServerVersion}}"],
            env={**os.environ, "DOCKER_HOST": host},
            capture_output=True,
            timeout=15,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@contextlib.contextmanager
def cache_lock(cache: Path) -> Iterator[None]:
    """Hold the cache's lock: one run at a time uses its data root and its images."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "lock", "w") as handle:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"{cache / 'lock'} held by another run for {LOCK_TIMEOUT_S} s"
                    ) from None
                time.sleep(2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def docker_engine(compose: list[str], cache: Path = CACHE) -> Iterator[Engine]:
    """An engine that answers already, or a private dockerd for the duration (stopped after)."""
    docker = docker_client()
    if docker is None:
        raise EngineUnavailable("no docker client: scripts/setup.sh installs Debian's docker.io")
    for host in filter(None, (os.environ.get("DOCKER_HOST"), "unix:///var/run/docker.sock")):
        if _answers(docker, host):
            with cache_lock(cache):
                engine = Engine(docker, compose, host)
                try:
                    yield engine
                finally:
                    shutil.rmtree(engine.config_dir, ignore_errors=True)
            return
    if os.geteuid() != 0:
        raise EngineUnavailable("no Docker engine answers, and starting one needs root")
    dockerd = shutil.which("dockerd") or (
        "/usr/sbin/dockerd" if Path("/usr/sbin/dockerd").is_file() else None
    )
    if dockerd is None:
        raise EngineUnavailable("no dockerd: scripts/setup.sh installs Debian's docker.io")
    with cache_lock(cache):
        _stop_orphan(cache)
        # The exec root holds containerd's sockets: a short path.
        run_dir = Path(
            tempfile.mkdtemp(prefix="l0t-d-", dir="/run" if os.access("/run", os.W_OK) else None)
        )
        log = cache / "dockerd.log"
        engine = Engine(docker, compose, f"unix://{run_dir}/docker.sock", log=log)
        argv = [
            dockerd,
            f"--data-root={cache / 'engine'}",
            f"--exec-root={run_dir / 'x'}",
            f"--pidfile={run_dir / 'dockerd.pid'}",
            f"--host={engine.host}",
            "--storage-driver=overlay2",
            # No default bridge and no iptables rules: compose makes its own network, published
            # ports go through docker-proxy, and this machine's firewall is left alone.
            "--iptables=false",
            "--bridge=none",
        ]
        with open(log, "w") as out:
            process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        (cache / "dockerd.pid").write_text(str(process.pid))
        try:
            deadline = time.monotonic() + ENGINE_START_TIMEOUT_S
            while not _answers(docker, engine.host):
                if process.poll() is not None:
                    raise AssertionError(
                        f"dockerd exited {process.returncode}\n{engine.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"dockerd silent after {ENGINE_START_TIMEOUT_S} s\n{engine.log_tail()}"
                    )
                time.sleep(0.5)
            yield engine
        finally:
            _stop(process)
            (cache / "dockerd.pid").unlink(missing_ok=True)
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.rmtree(engine.config_dir, ignore_errors=True)


def _stop_orphan(cache: Path) -> None:
    """Stop the dockerd a killed earlier run left on this cache's data root (by the pid it
    recorded, and only if that process is still a dockerd on this data root)."""
    pidfile = cache / "dockerd.pid"
    if not pidfile.is_file():
        return
    pid = int(pidfile.read_text() or 0)
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    if (
        not cmdline[0].endswith(b"dockerd")
        or f"--data-root={cache / 'engine'}".encode() not in cmdline
    ):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _stop(process: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGTERM dockerd (it stops its containers and its containerd), SIGKILL its group after."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)
