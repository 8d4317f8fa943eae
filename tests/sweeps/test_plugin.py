"""A lab's own networks, registered through the ``l0sweep.models`` entry point of a package the
test writes, pip-installs into this environment (and uninstalls), and sweeps with ``l0sweep run``:
the residual network sweeps with output gates and shrinks; a network whose export check fails
(attention whose head count is chosen by Python control flow on the input's width, which
torch.fx cannot trace) fails the sweep before any trial trains, naming the module and why."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from sweeps import tracking

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PACKAGE = "l0sweep-test-lab-nets"

PYPROJECT = f"""
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "{PACKAGE}"
version = "0.1.0"
dependencies = []

[project.entry-points."l0sweep.models"]
lab = "lab_nets"

[tool.setuptools]
packages = ["lab_nets"]
"""

LAB_NETS = '''
"""A lab's networks: a residual CNN in torchvision's layout, and a conv + attention network."""

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sweeps.registry import register_model


class LabResNetParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: int = Field(default=16, ge=1)
    blocks: int = Field(default=2, ge=1)


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class LabResNet(nn.Module):
    def __init__(self, channels, width, blocks, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(channels, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.layers = nn.Sequential(*[Block(width) for _ in range(blocks)])
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.layers(self.relu(self.bn(self.conv(x))))
        return self.fc(x.mean((2, 3)))


@register_model("lab-resnet", params=LabResNetParams)
def lab_resnet(params, input_shape, num_classes):
    """The lab's residual network."""
    return LabResNet(input_shape[0], params.width, params.blocks, num_classes)


class SelfAttention(nn.Module):
    """Heads by reshape, the head count chosen by Python control flow on the input's width:
    torch.fx cannot trace a branch on a traced value, so the walk cannot follow the heads."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        heads = self.heads if d >= 4 * self.heads else 1
        q, k, v = self.qkv(x).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class LabAttention(nn.Module):
    def __init__(self, channels, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(channels, 16, 3, padding=1)
        self.attn = SelfAttention(16, 4)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        t = self.conv(x).flatten(2).transpose(1, 2)
        return self.fc(self.attn(t).mean(1))


@register_model("lab-attention")
def lab_attention(params, input_shape, num_classes):
    """A conv stem and hand-written attention whose head count branches on ``x.shape``."""
    return LabAttention(input_shape[0], num_classes)
'''


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                   check=True, capture_output=True, text=True)  # fmt: skip


@pytest.fixture(scope="module")
def lab_package(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("lab_package")
    (root / "pyproject.toml").write_text(PYPROJECT)
    (root / "lab_nets").mkdir()
    (root / "lab_nets" / "__init__.py").write_text(textwrap.dedent(LAB_NETS))
    _pip("install", "--no-deps", "--no-build-isolation", "--no-index", str(root))
    try:
        yield root
    finally:
        _pip("uninstall", "-y", PACKAGE)


def _run(tmp_path: Path, spec: dict, uri: str) -> tuple[subprocess.CompletedProcess, str]:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    l0sweep = Path(sys.executable).with_name("l0sweep")
    done = subprocess.run(
        [str(l0sweep), "run", str(path), "--tracking-uri", uri,
         "--storage-path", str(tmp_path / "ray_results")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    found = re.search(r"sweep ([0-9a-f]{32}) (\w+)", done.stdout)
    assert found, done.stdout + done.stderr
    return done, found.group(1)


def _spec(name: str, model: dict, regularizer: dict) -> dict:
    return {
        "name": name,
        "experiment": "tests-plugin",
        "model": model,
        "dataset": {"name": "digits"},
        "regularizer": regularizer,
        "train": {"epochs": 2, "batch_size": 64, "lr": 3e-3, "gate_lr": 0.3},
    }


def test_a_labs_residual_network_sweeps_and_shrinks_with_l0sweep_run(lab_package, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = _spec(
        "lab-resnet", {"name": "lab-resnet", "params": {"width": 16, "blocks": 2}},
        {"kind": "l0", "granularity": "output", "lam": 0.05, "droprate_init": 0.3},
    )  # fmt: skip
    done, sweep_id = _run(tmp_path, spec, uri)
    assert done.returncode == 0 and f"sweep {sweep_id} FINISHED" in done.stdout, done.stderr[-3000:]
    (trial,) = tracking.sweep_trials(sweep_id, uri)
    assert trial.status == "FINISHED"
    m = trial.metrics
    assert m["shrunk_params"] < m["total_params"], m  # the export removed whole channels
    assert m["sparsity"] > 0 and 0 <= m["test_accuracy"] <= 1


def test_a_model_that_cannot_shrink_fails_the_sweep_before_training(lab_package, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = _spec("lab-attention", {"name": "lab-attention"},
                 {"kind": "l0", "granularity": "head", "lam": 0.1})  # fmt: skip
    done, sweep_id = _run(tmp_path, spec, uri)
    assert done.returncode == 1 and f"sweep {sweep_id} FAILED" in done.stdout
    tags = tracking.client(uri).get_run(sweep_id).data.tags
    assert tags["l0sweep.status"] == "FAILED"
    message = tags["l0sweep.status_message"]
    assert "cannot be shrunk at granularity 'head'" in message
    assert "attn (SelfAttention) is not a module the graph walk knows" in message
    assert "cannot be used as inputs to control flow" in message
    assert tracking.sweep_trials(sweep_id, uri) == []  # no trial trained
    assert not (tmp_path / "ray_results" / sweep_id).exists()  # Tune never started
