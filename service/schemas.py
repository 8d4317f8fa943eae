"""Response models of the REST API, shared by the typed client (pydantic only, no FastAPI)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from sweeps import vocabulary
from sweeps.records import TrialRecord

__all__ = [
    "BackendHealth",
    "Health",
    "ParetoFront",
    "Progress",
    "RegistryEntry",
    "SweepLinks",
    "SweepOut",
    "SweepPage",
    "TrialOut",
]

# The API's spelling of sweeps.vocabulary.SweepStatus: a Literal, so that the OpenAPI schema
# lists the values inline as it always has.
SweepStatus = Literal[tuple(s.value for s in vocabulary.SweepStatus)]  # type: ignore[valid-type]
TERMINAL: frozenset[str] = vocabulary.TERMINAL_SWEEP
ACTIVE: frozenset[str] = vocabulary.ACTIVE_SWEEP


class Progress(BaseModel):
    """Trial counts of a sweep; ``pending`` includes trials Tune has not started yet."""

    total: int = 0
    pending: int = 0
    running: int = 0
    finished: int = 0
    failed: int = 0
    stopped: int = 0


class SweepLinks(BaseModel):
    self: str
    trials: str
    pareto: str
    mlflow: str | None = Field(None, description="The parent run in the MLflow UI.")
    ray_job: str | None = Field(None, description="The driver's job in the Ray dashboard.")


class SweepOut(BaseModel):
    """A sweep: its MLflow parent run, its status tag, its Ray job and its trials' progress."""

    id: str = Field(description="The MLflow parent run id.")
    name: str
    experiment_id: str
    status: SweepStatus
    message: str | None = None
    created_at: datetime | None = None
    ended_at: datetime | None = None
    job_id: str | None = Field(None, description="The Ray job's submission id.")
    cancel_requested: bool = False
    progress: Progress
    best: dict[str, Any] | None = Field(
        None, description="The best trial so far on the first objective: its id and metrics."
    )
    objectives: list[dict[str, Any]] = Field(default_factory=list)
    duplicate_trials: int = Field(
        0,
        description="Trials of the spec's expansion not run: each equal to another trial once "
        "the fields its method ignores are dropped (progress.total counts the distinct ones).",
    )
    links: SweepLinks


class SweepPage(BaseModel):
    items: list[SweepOut]
    total: int | None = Field(
        description="Sweeps matching the filters; null for the first seconds after the service "
        "starts, while it reads the history (``next_offset`` says whether more follow)."
    )
    limit: int
    offset: int
    next_offset: int | None = None


class TrialOut(BaseModel):
    """A trial's child run: config (its params), latest metrics, status."""

    id: str = Field(description="The Tune trial id.")
    run_id: str | None = Field(None, description="The trial's MLflow child run.")
    status: str = Field(description="RUNNING, FINISHED, STOPPED (early), FAILED or KILLED.")
    config: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float | None] = Field(default_factory=dict)
    pareto: bool = False
    failure_reason: str | None = None

    @classmethod
    def of(cls, trial: TrialRecord) -> TrialOut:
        """The API's view of a trial's record (the one mapping: the routes and the CLI)."""
        return cls(
            id=trial.id,
            run_id=trial.run_id,
            status=str(trial.status or "PENDING"),
            config=trial.config,
            metrics=trial.metrics,
            pareto=trial.pareto,
            failure_reason=trial.failure_reason,
        )


class ParetoFront(BaseModel):
    sweep_id: str
    status: SweepStatus
    objectives: list[dict[str, Any]]
    front: list[TrialOut]
    num_trials: int = Field(
        description="Trials that compete: finished or running, all objectives finite."
    )
    hypervolume: float | None = Field(
        None, description="Volume the front dominates (origin reference)."
    )


class RegistryEntry(BaseModel):
    """A model or dataset a spec may name, with the JSON Schema of its ``params``."""

    name: str
    description: str = ""
    params: dict[str, Any] = Field(default_factory=dict)


class BackendHealth(BaseModel):
    ok: bool
    url: str | None = None
    detail: str | None = None


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    ray: BackendHealth
    mlflow: BackendHealth
