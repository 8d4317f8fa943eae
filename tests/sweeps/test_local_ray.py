"""The local Ray of ``l0sweep run`` starts no dashboard: one would take port 8265 (or the next
free one), the port an ``l0sweep serve`` started beside it wants for its Ray head. The serve
stack then found a dashboard answering there, the local run's, and its own never bound; when the
local run ended, serve failed with "the Ray dashboard at http://127.0.0.1:8265 gave no session
name (... Connection refused)"."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

_PROBE = """
import json
from sweeps.config import SweepSettings
from sweeps.driver import start_local_ray
context = start_local_ray(SweepSettings())
print(json.dumps({"dashboard": context.dashboard_url}))
"""


def test_the_local_ray_of_a_sweep_run_starts_no_dashboard() -> None:
    # A process of its own: this worker may have a Ray of its own already.
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert not answer["dashboard"], answer
