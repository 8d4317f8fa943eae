"""The l0sweep service: a REST control plane that records sweeps in MLflow and runs them as Ray Jobs.

The service validates a `sweeps.spec.SweepSpec`, records the sweep as an MLflow parent run and
submits the sweeps driver as a Ray Job. It keeps no state of its own (MLflow is the record), so it
can be restarted at any time; see ARCHITECTURE.md for the reasons.
"""

from service.app import create_app
from service.settings import Settings

__all__ = ["Settings", "create_app"]
