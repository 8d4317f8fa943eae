"""In-memory fakes for the fast tier (``pytest -m fast``): a clock, and the protocols the control
plane talks to (MLflow's store of sweeps, Ray's job runner). The real-component tests use the
real parts; these let the decisions be checked in milliseconds."""

from __future__ import annotations

import time


class FakeClock:
    """A clock that moves only when slept on: retries measured in its time, instantly."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class RecordingClock:
    """The real clock, recording what was slept on it (a retry waits by sleeping)."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        time.sleep(seconds)
