"""The lab cluster's compose files, read by Docker Compose v2 itself (`config`: interpolation,
merges and validation against the Compose specification, no engine needed), and the promises
the README's "Lab cluster" section makes about them: health checks everywhere, start-up in
health order, secrets only from the environment, entrypoints that exist, scalable CPU workers,
GPU workers that reserve NVIDIA GPUs, one shared volume for Tune's storage and the data.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.docker.conftest import DOCKER, ENTRYPOINTS

SECRETS = ("L0SWEEP_TOKEN", "RAY_AUTH_TOKEN", "POSTGRES_PASSWORD")
# Values for the test only; the addresses are documentation examples, nothing connects to them.
ENV = {
    "L0SWEEP_TOKEN": "api-token-for-the-test",
    "RAY_AUTH_TOKEN": "ray-token-for-the-test",
    "POSTGRES_PASSWORD": "password-for-the-test",
}
ACROSS_HOSTS = {"L0SWEEP_HEAD_IP": "192.0.2.10", "L0SWEEP_SHARED": "/mnt/lab/l0sweep"}
# The stacks an admin brings up: one machine (with and without GPUs), the lab machine of a
# multi-host cluster, and a GPU machine joining it: (files, profiles, settings beyond ENV).
STACKS = {
    "one-machine": (["compose.yaml"], [], {}),
    "one-machine-gpu": (["compose.yaml"], ["gpu"], {}),
    "multihost": (["compose.yaml", "compose.multihost.yaml"], ["gpu"], ACROSS_HOSTS),
    "gpu-node": (
        ["compose.gpu-node.yaml"],
        [],
        {"RAY_HEAD_ADDRESS": "192.0.2.10:6379", "L0SWEEP_SHARED": "/mnt/lab/l0sweep"},
    ),
}
IMAGE_ENTRYPOINTS = "/opt/l0sweep/entrypoints/"


class _ComposeLoader(yaml.SafeLoader):
    """YAML as written, with Compose's merge tags (``!reset``, ``!override``) read as plain values."""


for _tag in ("!reset", "!override"):
    _ComposeLoader.add_constructor(
        _tag,
        lambda loader, node: (
            loader.construct_sequence(node)
            if isinstance(node, yaml.SequenceNode)
            else loader.construct_mapping(node)
            if isinstance(node, yaml.MappingNode)
            else loader.construct_scalar(node)
        ),
    )


def run_config(
    compose: list[str], files: list[str], profiles: list[str], env: dict[str, str], tmp: Path
) -> subprocess.CompletedProcess:
    # An empty --env-file: a developer's docker/.env must not leak into the test.
    env_file = tmp / "empty.env"
    env_file.write_text("")
    argv = [*compose, "--project-directory", str(DOCKER), "--env-file", str(env_file)]
    for name in files:
        argv += ["-f", str(DOCKER / name)]
    for profile in profiles:
        argv += ["--profile", profile]
    clean = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR")}
    return subprocess.run(
        [*argv, "config", "--format", "json"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def load(compose: list[str], stack: str, tmp: Path) -> dict:
    files, profiles, settings = STACKS[stack]
    done = run_config(compose, files, profiles, {**ENV, **settings}, tmp)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module", params=sorted(STACKS))
def stack(request, compose, tmp_path_factory) -> tuple[str, dict]:
    return request.param, load(compose, request.param, tmp_path_factory.mktemp("compose"))


def test_every_service_has_a_health_check_and_waits_for_healthy_dependencies(stack) -> None:
    _, model = stack
    for name, service in model["services"].items():
        check = service.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no health check"
        assert check["test"][0] in {"CMD", "CMD-SHELL"}, name
        for dependency, how in (service.get("depends_on") or {}).items():
            assert how["condition"] == "service_healthy", f"{name} -> {dependency}: {how}"


def test_entrypoints_and_health_checks_name_scripts_that_exist(stack) -> None:
    _, model = stack
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert f"COPY docker/entrypoints {IMAGE_ENTRYPOINTS.rstrip('/')}" in dockerfile
    for name, service in model["services"].items():
        named = [*(service.get("command") or []), *service["healthcheck"]["test"][1:]]
        for arg in named:
            if arg.startswith(IMAGE_ENTRYPOINTS):
                script = ENTRYPOINTS / arg.removeprefix(IMAGE_ENTRYPOINTS)
                assert script.is_file() and os.access(script, os.X_OK), f"{name}: {script}"
        if service.get("build"):  # our image: its command is one of our entrypoints
            assert service["command"][0].startswith(IMAGE_ENTRYPOINTS), name
            role = service["healthcheck"]["test"][-1]
            assert f"\n    {role})" in (ENTRYPOINTS / "healthcheck.sh").read_text(), role


def test_secrets_come_from_the_environment(stack) -> None:
    _, model = stack
    seen = set()
    for service in model["services"].values():
        for key, value in (service.get("environment") or {}).items():
            if key in SECRETS:
                assert value == ENV[key], f"{key} is not the environment's value"
                seen.add(key)
    assert seen, "no secret reaches any service"


@pytest.mark.parametrize("stack_name", sorted(STACKS))
def test_a_missing_secret_stops_compose_with_its_name(compose, tmp_path, stack_name) -> None:
    files, profiles, settings = STACKS[stack_name]
    text = "".join((DOCKER / f).read_text() for f in files)
    for secret in SECRETS:
        if f"${{{secret}" not in text:
            continue
        env = {k: v for k, v in {**ENV, **settings}.items() if k != secret}
        done = run_config(compose, files, profiles, env, tmp_path)
        assert done.returncode != 0
        assert f"required variable {secret} is missing a value: set {secret}" in done.stderr


@pytest.mark.parametrize("path", sorted(DOCKER.glob("compose*.yaml")), ids=lambda p: p.name)
def test_no_secret_has_a_default(path: Path) -> None:
    text = path.read_text()
    for match in re.finditer(r"\$\{(\w+)([^}]*)\}", text):
        name, rest = match.groups()
        if name in SECRETS or re.search(r"PASSWORD|TOKEN|SECRET", name):
            assert rest.startswith(":?") and len(rest) > 2, f"{path.name}: {match.group(0)}"
    # And no literal value either: every secret in an environment block is interpolated.
    for service in (yaml.load(text, _ComposeLoader).get("services") or {}).values():
        for key, value in (service.get("environment") or {}).items():
            if key in SECRETS:
                assert str(value).startswith(f"${{{key}:?"), f"{path.name}: {key}={value}"


def test_the_env_example_leaves_every_secret_empty() -> None:
    lines = (DOCKER / ".env.example").read_text().splitlines()
    values = dict(line.split("=", 1) for line in lines if re.match(r"^[A-Z0-9_]+=", line))
    for secret in SECRETS:
        assert values.get(secret) == "", f".env.example gives {secret} a value"
    assert (DOCKER / ".gitignore").read_text().count(".env") >= 1


def test_one_machine_topology(compose, tmp_path) -> None:
    services = load(compose, "one-machine-gpu", tmp_path)["services"]
    assert set(services) == {
        "postgres",
        "mlflow",
        "ray-head",
        "ray-worker",
        "ray-worker-gpu",
        "api",
    }
    assert "ray-worker-gpu" not in load(compose, "one-machine", tmp_path)["services"]

    mlflow = services["mlflow"]["environment"]
    assert mlflow["POSTGRES_HOST"] == "postgres"
    assert mlflow["MLFLOW_ARTIFACTS_DESTINATION"] == "/mlflow/artifacts"
    assert any(
        v["source"] == "mlflow-artifacts" and v["target"] == "/mlflow/artifacts"
        for v in services["mlflow"]["volumes"]
    )
    published = {
        name: {int(p["target"]) for p in service.get("ports", [])}
        for name, service in services.items()
    }
    assert published == {
        "postgres": set(),
        "mlflow": {5000},
        "ray-head": {8265},
        "ray-worker": set(),
        "ray-worker-gpu": set(),
        "api": {8000},
    }

    api = services["api"]["environment"]
    assert api["L0SWEEP_RAY_ADDRESS"] == "http://ray-head:8265"
    assert api["L0SWEEP_TRACKING_URI"] == "http://mlflow:5000"
    assert services["ray-head"]["environment"]["RAY_NUM_CPUS"] == "0"

    # Scalable workers: no fixed container name, nothing published.
    for name in ("ray-worker", "ray-worker-gpu"):
        assert "container_name" not in services[name]
        assert services[name]["environment"]["RAY_HEAD_ADDRESS"] == "ray-head:6379"
    gpu = services["ray-worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu["build"]["args"]["TORCH_VARIANT"].startswith("cu")

    # One shared volume holds Tune's storage path and the data on every node and the API.
    for name in ("ray-head", "ray-worker", "ray-worker-gpu", "api"):
        mounts = {v["target"]: v["source"] for v in services[name]["volumes"]}
        assert mounts["/shared"] == "shared", name
        env = services[name]["environment"]
        assert env["L0SWEEP_STORAGE_PATH"].startswith("/shared/"), name
        assert env["L0SWEEP_DATA_DIR"].startswith("/shared/"), name


def test_multihost_puts_ray_on_the_host_network(compose, tmp_path) -> None:
    services = load(compose, "multihost", tmp_path)["services"]
    for name in ("ray-head", "ray-worker", "ray-worker-gpu"):
        assert services[name]["network_mode"] == "host", name
        assert not services[name].get("ports"), name
    assert services["ray-head"]["environment"]["RAY_NODE_IP_ADDRESS"] == "192.0.2.10"
    assert services["ray-worker"]["environment"]["RAY_HEAD_ADDRESS"] == "192.0.2.10:6379"
    # Trials on other hosts log to MLflow through its published port.
    assert services["api"]["environment"]["L0SWEEP_TRACKING_URI"] == "http://192.0.2.10:5000"
    for name in ("ray-head", "ray-worker", "ray-worker-gpu", "api"):
        mounts = {v["target"]: v["source"] for v in services[name]["volumes"]}
        assert mounts["/shared"] == ACROSS_HOSTS["L0SWEEP_SHARED"], name


def test_gpu_node_joins_the_given_head(compose, tmp_path) -> None:
    services = load(compose, "gpu-node", tmp_path)["services"]
    assert set(services) == {"ray-worker-gpu"}
    worker = services["ray-worker-gpu"]
    assert worker["network_mode"] == "host"
    assert worker["environment"]["RAY_HEAD_ADDRESS"] == "192.0.2.10:6379"
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def test_the_image_runs_as_a_non_root_user() -> None:
    dockerfile = (DOCKER / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, flags=re.MULTILINE)
    assert users and users[-1] not in {"root", "0"}
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", dockerfile, flags=re.MULTILINE)
    ignored = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignored[ignored.index("*") :].count("!docker/entrypoints/") == 1
