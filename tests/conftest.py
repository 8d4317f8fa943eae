"""The suite's tiers and its parallel run.

Modules of pure logic whose tests are all in the fast tier (``make test-fast``, marker ``fast``)
are listed here, so that the tier is chosen in one place; newer fast tests carry the marker
themselves.

``make test`` runs the suite on two pytest-xdist workers (``-n 2 --dist loadgroup``): each
worker is a whole pytest session of its own, with its own Ray head, MLflow server and
PostgreSQL (the session fixtures), free ports, temporary directories and ``L0SWEEP_HOME``. The
tests of one module run in one worker, in order (module fixtures and ``tally`` tests count on
it), except the modules in ``_SPLIT_MODULES``, whose tests are independent and long enough to be
worth spreading over both workers, and those in ``_SHARED_GROUPS``, which must not run beside
each other.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Whole modules of pure logic: no Ray or MLflow process, seconds in all.
_FAST_MODULES = frozenset(
    {
        "tests/sweeps/test_pareto.py",
        "tests/sweeps/test_results.py",
        "tests/sweeps/test_spec.py",
        "tests/sweeps/test_variants.py",
        "tests/service/test_ports.py",
        "tests/service/test_ray_token.py",
        "tests/service/test_summary.py",
    }
)

# Modules whose slow tests share nothing but the session's fixtures (no module fixture, no
# tally): under ``--dist loadgroup`` each of their tests is a group of its own.
_SPLIT_MODULES = frozenset(
    {
        "tests/service/test_faults.py",
        "tests/service/test_lifecycle.py",
        "tests/service/test_local_runs.py",
        "tests/sweeps/test_finetune_integration.py",
        "tests/sweeps/test_sweep_integration.py",
        "tests/sweeps/test_zoo_trials.py",
    }
)


# Modules that must not run beside each other, one group each: `l0sweep serve` with nothing set
# starts MLflow and Ray on their default ports (5000, 8265) when they look free, so two such stacks
# started at once would both take them.
_SHARED_GROUPS = {
    "tests/service/test_stack.py": "serve-on-default-ports",
    "tests/service/test_secrets.py": "serve-on-default-ports",
}


def pytest_configure(config: pytest.Config) -> None:
    """The test process starts up as the service, the CLI and the driver do: MLflow's client
    settings in its environment (inherited by the local Ray workers it starts). Every session
    (each xdist worker is one) gets an ``L0SWEEP_HOME`` of its own, so that nothing a test leaves
    under the default home (``~/.l0sweep``) meets another session's."""
    from sweeps.config import configure_mlflow_client

    configure_mlflow_client(0.0)
    home = tempfile.mkdtemp(prefix="l0t-home-")
    # Every trial the suite runs (a few hundred, inheriting this environment through the Ray
    # heads and local Rays the tests start) times its exported model from one sample per figure
    # instead of five: the timing loops cost a trial about half a second whatever its model,
    # much of a trial on the suite's tiny models. Tests that check the measurement set their own.
    ours = {
        "L0SWEEP_HOME": home,
        "L0SWEEP_SPEED_ROUNDS": os.environ.get("L0SWEEP_SPEED_ROUNDS", "1"),
    }
    before = {k: os.environ.get(k) for k in ours}
    os.environ.update(ours)

    def restore() -> None:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(home, ignore_errors=True)

    config.add_cleanup(restore)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Two workers on two cores: each trains in-process on one intra-op thread (as each trial
        # does), not two that contend with the other worker's (the CPU time of an in-process
        # training test drops by a third).
        import torch

        torch.set_num_threads(1)
    if _loadgroup(config) and not _xdist_can_group():
        raise pytest.UsageError(
            f"--dist loadgroup: pytest {pytest.__version__} does not let pytest-xdist mark a "
            "test's group (every test would be its own group: a module's fixtures set up on each "
            "worker, tests that must not run side by side at once); pyproject.toml pins the "
            "versions that work"
        )


def _loadgroup(config: pytest.Config) -> bool:
    """``--dist loadgroup``, in the controller or in a worker: xdist sets a worker's ``dist`` to
    ``"no"`` and its ``loadgroup`` to ``True``, and the groups must be marked in the workers (they
    collect, and the controller schedules by the node ids they report, ``...@group``)."""
    return bool(getattr(config.option, "loadgroup", False)) or (
        getattr(config.option, "dist", "no") == "loadgroup"
    )


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = config.rootpath
    for item in items:
        module = item.path.relative_to(root).as_posix()
        if module in _FAST_MODULES:
            item.add_marker(pytest.mark.fast)
        if _loadgroup(config) and not item.get_closest_marker("xdist_group"):
            group = item.nodeid if module in _SPLIT_MODULES else module
            group = _SHARED_GROUPS.get(module, group)
            item.add_marker(pytest.mark.xdist_group(group))
    if _loadgroup(config):
        _slow_groups_first(items)


def _xdist_can_group() -> bool:
    """Whether pytest-xdist's way of marking a test's group works: it rewrites ``item._nodeid``
    (to ``...@group``, all the controller schedules by), which pytest 9.2 no longer reads."""
    from types import SimpleNamespace

    from _pytest.nodes import Node

    try:
        return Node.nodeid.fget(SimpleNamespace(_nodeid="t@g")) == "t@g"
    except AttributeError:
        return False


def _slow_groups_first(items: list[pytest.Item]) -> None:
    """Under ``--dist loadgroup --no-loadscope-reorder`` the workers take the groups in the
    order of the collection: put the groups that hold a slow test (marker ``slow``) first, each
    set still in its random order (pytest-randomly shuffles before this hook) and every group's
    tests in theirs, so that no minutes-long test starts last while the other worker idles."""

    def group(item: pytest.Item) -> str:
        return item.get_closest_marker("xdist_group").args[0]

    slow = {group(item) for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: group(item) not in slow)


@dataclass(frozen=True)
class RayHead:
    """The session's Ray head: its dashboard (the Jobs API the service submits to) and its GCS
    address (what ``ray.init`` attaches a driver to)."""

    url: str
    gcs_address: str


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    """One real Ray head (``ray start --head``, 2 CPUs) per worker, for the service's tests and
    the in-process sweeps alike: a second cluster per worker cost about 20 s of CPU (start-up,
    then its processes polling for the rest of the session) on a machine the suite keeps busy."""
    from service.stack import free_port, start_ray_head

    # Ray's session files need a short path (Unix sockets); pytest's tmp paths are too long.
    temp_dir = tempfile.mkdtemp(prefix="l0t-ray-")
    process, url = start_ray_head(
        tmp_path_factory.mktemp("ray-logs"),
        num_cpus=2,
        dashboard_port=free_port(),
        temp_dir=temp_dir,
    )
    try:
        # `ray start` writes the head's GCS address there (what `ray.init(address="auto")`
        # reads), once the head is up: soon after its dashboard answers.
        current = Path(temp_dir) / "ray_current_cluster"
        deadline = time.monotonic() + 120
        while not (current.exists() and current.read_text().strip()):
            assert process.running and time.monotonic() < deadline, (
                f"no {current}; see {process.log_path}"
            )
            time.sleep(0.2)
        yield RayHead(url, current.read_text().strip())
    finally:
        process.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_address(ray_head: RayHead) -> str:
    """The session's Ray head as the service reaches it (its dashboard URL)."""
    return ray_head.url


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real ``mlflow server`` per worker (SQLite store, local artifacts), started when a test
    first needs it."""
    from service.stack import free_port, start_mlflow

    process, uri = start_mlflow(tmp_path_factory.mktemp("mlflow"), port=free_port())
    yield uri
    process.stop()


@pytest.fixture(autouse=True)
def _mlflow_tracking_uri_restored() -> Iterator[None]:
    """MLflow's process-wide tracking URI (``mlflow.set_tracking_uri``, which logging a model or
    the speed pass call in-process) as it was before each test: a test that reads MLflow's
    default saw the server of a test that ran before it in the same worker."""
    from mlflow.tracking._tracking_service import utils

    before = utils._tracking_uri
    yield
    utils._tracking_uri = before
