"""What the import-linter contracts (``make lint``) cannot see: they know a third-party package
only whole, so Ray's private APIs are kept inside ``sweeps.raycompat`` here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRIVATE_RAY = re.compile(r"\bray\._private\b|\._local_tuner\b|\b_raise_error\b")


@pytest.mark.fast
def test_rays_private_apis_only_in_raycompat():
    users = sorted(
        str(path.relative_to(ROOT))
        for package in ("l0core", "sweeps", "service", "tests", "benchmarks")
        for path in (ROOT / package).rglob("*.py")
        if path.name != "test_layers.py" and PRIVATE_RAY.search(path.read_text())
    )
    assert users == ["sweeps/raycompat.py"], users
