"""The images of the lab cluster's test, none pulled from a registry (tests/docker/engine.py runs them).

A Debian bookworm base with python3 made by ``debootstrap`` and imported (its root file system is
cached as a tarball in the cache directory), a site layer on it (this machine's CA bundle,
trusted by pip), PostgreSQL from Debian's packages, and the project's image built by
``docker compose build`` from docker/Dockerfile with the site layer as ``BASE_IMAGE``. A local
PyTorch CPU wheel found in pip's ``find-links`` is served to the build over HTTP on loopback (the
build uses the host's network), so torch is not downloaded again.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from tests.docker.engine import CACHE, PROJECT_PREFIX, REPO, Engine, EngineUnavailable

IMAGES = Path(__file__).resolve().parent / "images"
DEBIAN_MIRROR = os.environ.get("L0SWEEP_DEBIAN_MIRROR", "http://deb.debian.org/debian")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

BASE_IMAGE = "l0sweep-test/debian:bookworm-python3"
SITE_IMAGE = "l0sweep-test/site:bookworm"
POSTGRES_IMAGE = "l0sweep-test/postgres:bookworm"
PROJECT_IMAGE = "l0sweep-test/l0sweep:cpu"

# Where the local wheels are served to the build: always the same URL, since a build argument
# that changes (PIP_FIND_LINKS) invalidates BuildKit's cache of every step after it. An address
# of loopback's own /8 that nothing else here uses.
WHEEL_SERVER = ("127.76.48.1", 8765)

DEBOOTSTRAP_TIMEOUT_S = 900
BUILD_TIMEOUT_S = 1500


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
