"""A real Docker engine for the lab cluster's test, and the images it needs, without a registry.

The engine is one that already answers (``DOCKER_HOST`` or the default socket) or, as root, a
private ``dockerd`` started here with its own socket and exec root, and its data root under
the cache directory (``L0SWEEP_DOCKER_CACHE``, default ``/var/cache/l0sweep-docker``, outside
any clone): images and BuildKit's cache survive between runs, which is what makes a warm run
quick. A lock file in the cache keeps two runs from sharing one data root at once.

Images, none pulled: a Debian bookworm base with python3 made by ``debootstrap`` and imported
(its root file system is cached as a tarball), a site layer on it (this machine's CA bundle,
trusted by pip), PostgreSQL from Debian's packages, and the project's image built by
``docker compose build`` from docker/Dockerfile with the site layer as ``BASE_IMAGE``. A local
PyTorch CPU wheel found in pip's ``find-links`` is served to the build over HTTP on loopback (the
build uses the host's network), so torch is not downloaded again.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import http.server
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMAGES = Path(__file__).resolve().parent / "images"
CACHE = Path(os.environ.get("L0SWEEP_DOCKER_CACHE", "/var/cache/l0sweep-docker"))
DEBIAN_MIRROR = os.environ.get("L0SWEEP_DEBIAN_MIRROR", "http://deb.debian.org/debian")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

BASE_IMAGE = "l0sweep-test/debian:bookworm-python3"
SITE_IMAGE = "l0sweep-test/site:bookworm"
POSTGRES_IMAGE = "l0sweep-test/postgres:bookworm"
PROJECT_IMAGE = "l0sweep-test/l0sweep:cpu"
# Compose projects of these tests are named with this prefix (stale ones are removed).
PROJECT_PREFIX = "l0t-"

# Where the local wheels are served to the build: always the same URL, since a build argument
# that changes (PIP_FIND_LINKS) invalidates BuildKit's cache of every step after it. An address
# of loopback's own /8 that nothing else here uses.
WHEEL_SERVER = ("127.76.48.1", 8765)

ENGINE_START_TIMEOUT_S = 90
LOCK_TIMEOUT_S = 1200
DEBOOTSTRAP_TIMEOUT_S = 900
BUILD_TIMEOUT_S = 1500


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


# --- images -------------------------------------------------------------------------------------


def base_image(engine: Engine, cache: Path = CACHE) -> str:
    """Debian bookworm (minbase) with python3, its venv module and CA certificates, imported from
    a debootstrap root cached as a tarball."""
    if engine.has_image(BASE_IMAGE):
        return BASE_IMAGE
    tarball = cache / "bookworm-python3.tar"
    if not tarball.is_file():
        debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
        if not Path(debootstrap).is_file():
            raise EngineUnavailable(
                "no debootstrap: scripts/setup.sh installs Debian's debootstrap"
            )
        root = cache / "rootfs.partial"
        shutil.rmtree(root, ignore_errors=True)
        done = subprocess.run(
            [
                debootstrap, "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates,passwd",
                "bookworm", str(root), DEBIAN_MIRROR,
            ],
            capture_output=True, text=True, timeout=DEBOOTSTRAP_TIMEOUT_S,
        )  # fmt: skip
        assert done.returncode == 0, (
            f"debootstrap failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
        for leftovers in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (root / leftovers).glob("*"):
                if path.is_file():
                    path.unlink()
        partial = tarball.with_suffix(".partial")
        subprocess.run(["tar", "-C", str(root), "-cf", str(partial), "."], check=True, timeout=300)
        partial.rename(tarball)
        shutil.rmtree(root, ignore_errors=True)
    with open(tarball, "rb") as data:
        done = subprocess.run(
            [engine.docker, "import", "-", BASE_IMAGE],
            stdin=data, env=engine.env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert done.returncode == 0, f"docker import failed: {done.stderr}\n{engine.log_tail()}"
    return BASE_IMAGE


def _build(engine: Engine, tag: str, context: Path) -> None:
    """A small image of the test's own (plain RUN and COPY: the classic builder is enough, with any
    docker client), on the host's network."""
    engine.run(
        [engine.docker, "build", "--network=host", f"--build-arg=BASE_IMAGE={BASE_IMAGE}",
         "-t", tag, str(context)],
        timeout_s=BUILD_TIMEOUT_S, env=engine.env(DOCKER_BUILDKIT="0"),
    )  # fmt: skip


def site_image(engine: Engine) -> str:
    """The site layer: the base with this machine's CA bundle, trusted by pip."""
    with tempfile.TemporaryDirectory(prefix="l0t-site-") as context:
        shutil.copy(IMAGES / "site" / "Dockerfile", context)
        shutil.copy(CA_BUNDLE, Path(context) / "ca-certificates.crt")
        _build(engine, SITE_IMAGE, Path(context))
    return SITE_IMAGE


def postgres_image(engine: Engine) -> str:
    _build(engine, POSTGRES_IMAGE, IMAGES / "postgres")
    return POSTGRES_IMAGE


@functools.cache
def _pip_config() -> dict[str, str]:
    """pip's effective settings here (``pip config list``: files and PIP_* variables)."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60
    )
    found = {}
    for line in done.stdout.splitlines():
        match = re.match(r"^[^.]+\.([a-z-]+)='(.*)'$", line.strip())
        if match:
            found.setdefault(match.group(1), match.group(2))
    return found


def torch_version() -> str:
    """The torch the image pins (docker/Dockerfile's TORCH_VERSION)."""
    text = (REPO / "docker" / "Dockerfile").read_text()
    return re.search(r"^ARG TORCH_VERSION=(\S+)$", text, flags=re.MULTILINE).group(1)


def local_torch_wheels() -> Path | None:
    """A directory of pip's find-links here holding the pinned torch's CPU wheel for Python 3.11."""
    pattern = f"torch-{torch_version()}+cpu-cp311-cp311-*linux*_x86_64.whl"
    for entry in _pip_config().get("find-links", "").split():
        directory = Path(entry.removeprefix("file://"))
        if directory.is_dir() and any(directory.glob(pattern)):
            return directory
    return None


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Requests are not logged (pip asks for the listing once per requirement)."""


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """Serve ``directory``'s listing and files on loopback (pip reads the listing as find-links)."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    try:
        server = http.server.ThreadingHTTPServer(WHEEL_SERVER, handler)
    except OSError:  # taken: any port will do, at the price of the build's cache
        server = http.server.ThreadingHTTPServer((WHEEL_SERVER[0], 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{WHEEL_SERVER[0]}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def project_image(engine: Engine, env_file: Path) -> str:
    """docker/Dockerfile built by `docker compose build` (settings from ``env_file``), FROM the
    site layer, on the host's network; torch from a local CPU wheel when pip has one here, else
    from PyTorch's CPU index."""
    wheels = local_torch_wheels()
    env = engine.env(
        L0SWEEP_IMAGE=PROJECT_IMAGE, L0SWEEP_BASE_IMAGE=SITE_IMAGE, L0SWEEP_BUILD_NETWORK="host"
    )
    argv = [
        *engine.compose, "--project-directory", str(REPO / "docker"), "--env-file", str(env_file),
        "--project-name", f"{PROJECT_PREFIX}build", "build",
    ]  # fmt: skip
    with contextlib.ExitStack() as stack:
        if wheels is not None:
            url = stack.enter_context(serve_directory(wheels))
            # The +cpu wheel outranks PyPI's build of the same version; torch's own
            # dependencies come from the site's index.
            env["L0SWEEP_TORCH_INDEX_URL"] = _pip_config().get(
                "index-url", "https://pypi.org/simple"
            )
            argv += ["--build-arg", f"PIP_FIND_LINKS={url}"]
        engine.run([*argv, "api"], timeout_s=BUILD_TIMEOUT_S, env=env)
    return PROJECT_IMAGE
