"""One docker/compose.yaml project on a real engine, as the README tells an admin to run it: a
generated ``.env`` (the test's secrets, free ports on loopback), ``docker compose`` in docker/,
and what the tests ask of the running stack (the API with its token, the Ray dashboard, MLflow,
PostgreSQL through ``compose exec``).
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from service.stack import free_port
from tests.docker.build import PROJECT_IMAGE
from tests.docker.conftest import ray_dashboard_get
from tests.docker.engine import PROJECT_PREFIX, REPO, Engine

UP_TIMEOUT_S = 420
DOWN_TIMEOUT_S = 180


def write_env(path: Path, postgres_image: str, **overrides: str | None) -> dict[str, str]:
    """A docker/.env for the test: fresh secrets, free loopback ports, our images, one CPU per
    worker; an override of None leaves that line out. Returns what was written."""
    values: dict[str, str | None] = {
        "L0SWEEP_TOKEN": secrets.token_hex(32),
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "POSTGRES_PASSWORD": secrets.token_hex(24),
        "POSTGRES_IMAGE": postgres_image,
        "L0SWEEP_IMAGE": PROJECT_IMAGE,
        "L0SWEEP_BIND_ADDRESS": "127.0.0.1",
        "L0SWEEP_API_PORT": str(free_port()),
        "MLFLOW_UI_PORT": str(free_port()),
        "RAY_DASHBOARD_UI_PORT": str(free_port()),
        "RAY_WORKER_NUM_CPUS": "1",
        "RAY_SHM_SIZE": "1gb",
        "MLFLOW_WORKERS": "1",
        **overrides,
    }
    written = {k: v for k, v in values.items() if v is not None}
    path.write_text("".join(f"{k}={v}\n" for k, v in written.items()))
    return written


@dataclass
class Stack:
    """A compose project of docker/compose.yaml, named uniquely, with its own .env."""

    engine: Engine
    name: str
    env_file: Path
    settings: dict[str, str]

    @classmethod
    def create(cls, engine: Engine, directory: Path, postgres_image: str, **overrides) -> Stack:
        name = f"{PROJECT_PREFIX}{uuid.uuid4().hex[:8]}"
        env_file = directory / f"{name}.env"
        return cls(engine, name, env_file, write_env(env_file, postgres_image, **overrides))

    # --- compose --------------------------------------------------------------------------

    def compose_argv(self, *args: str) -> list[str]:
        return [
            *self.engine.compose, "--project-directory", str(REPO / "docker"),
            "--env-file", str(self.env_file), "--project-name", self.name, *args,
        ]  # fmt: skip

    def compose(self, *args: str, timeout_s: float = 120, check: bool = True):
        return self.engine.run(self.compose_argv(*args), timeout_s=timeout_s, check=check)

    def up(self, *args: str) -> None:
        """`up -d --wait`: every service started is healthy, or the failure shows their logs."""
        done = self.compose(
            "up", "-d", "--no-build", "--wait", "--wait-timeout", str(UP_TIMEOUT_S), *args,
            timeout_s=UP_TIMEOUT_S + 60, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise AssertionError(
                f"docker compose up {' '.join(args)} failed ({done.returncode}):\n"
                f"{done.stderr[-3000:]}\n{self.diagnosis()}"
            )

    def diagnosis(self) -> str:
        """`compose ps` and the last lines of every service's log, for a failure message."""
        ps = self.compose("ps", "-a", check=False).stdout
        logs = self.compose("logs", "--no-color", "--tail", "40", check=False).stdout
        return f"--- compose ps ---\n{ps}\n--- compose logs ---\n{logs[-12000:]}\n{self.engine.log_tail()}"

    def down(self) -> None:
        """`down -v`, then check that no container, volume or network of the project is left."""
        self.compose("down", "-v", "--timeout", "30", timeout_s=DOWN_TIMEOUT_S)
        assert self.leftovers() == {}, self.leftovers()

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.name}"
        found = {
            "containers": self.engine.docker_cmd("ps", "-aq", "--filter", label).stdout.split(),
            "volumes": self.engine.docker_cmd(
                "volume", "ls", "-q", "--filter", label
            ).stdout.split(),
            "networks": self.engine.docker_cmd(
                "network", "ls", "-q", "--filter", label
            ).stdout.split(),
        }
        return {kind: names for kind, names in found.items() if names}

    def containers(self, service: str) -> list[str]:
        """Names of the service's running containers."""
        done = self.compose("ps", "--format", "{{.Name}}", service)
        return sorted(done.stdout.split())

    def container_ip(self, container: str) -> str:
        template = "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}"
        return self.engine.docker_cmd("inspect", "--format", template, container).stdout.strip()

    def psql(self, sql: str) -> str:
        """One query through `compose exec` on the postgres service, its unaligned output."""
        return self.compose(
            "exec", "-T", "postgres", "sh", "-c",
            f'psql -U "$POSTGRES_USER" -d "$POSTGRES_DB" -tA -c "{sql}"',
        ).stdout.strip()  # fmt: skip

    # --- HTTP -----------------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.settings['L0SWEEP_API_PORT']}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.settings['MLFLOW_UI_PORT']}"

    def api(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.api_url,
            headers={"Authorization": f"Bearer {self.settings['L0SWEEP_TOKEN']}"},
            timeout=30,
        )

    def ray_get(self, path: str, **params: str) -> Any:
        """The Ray dashboard's REST API, with the cluster's token."""
        url = f"http://127.0.0.1:{self.settings['RAY_DASHBOARD_UI_PORT']}"
        return ray_dashboard_get(url, self.settings["RAY_AUTH_TOKEN"], path, **params)

    def node_ips(self) -> dict[str, str]:
        """Ray node id -> the node's address, for the cluster's live nodes."""
        nodes = self.ray_get("/api/v0/nodes")["data"]["result"]["result"]
        return {n["node_id"]: n["node_ip"] for n in nodes if n["state"] == "ALIVE"}

    def trial_actors(self, submission_id: str) -> list[dict[str, Any]]:
        """Tune's trial actors (``ImplicitFunc``) of one sweep's Ray job, dead ones included."""
        job = self.ray_get(f"/api/jobs/{submission_id}")["job_id"]
        actors = self.ray_get("/api/v0/actors", detail="true", limit="1000")
        return [
            a
            for a in actors["data"]["result"]["result"]
            if a["class_name"] == "ImplicitFunc" and a["job_id"] == job
        ]


def wait_for(poll: Callable[[], Any], until: Callable[[Any], bool], what: str, timeout_s: float,
             stack: Stack, every_s: float = 1.0) -> Any:  # fmt: skip
    """``poll()`` until ``until(value)``; on timeout fail with the last value and the stack's logs.
    A poll that raises (a service restarting) counts as not yet."""
    deadline = time.monotonic() + timeout_s
    value: Any = None
    while True:
        try:
            value = poll()
            if until(value):
                return value
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            value = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what}: not within {timeout_s:.0f} s; last: {value}\n{stack.diagnosis()}"
            )
        time.sleep(every_s)
