"""The sweeps resource: submit, list, follow, cancel and delete sweeps.

Reads come from the in-memory `SweepCache` (MLflow searches are too slow for the API's latency
target); writes go through `SweepControl`, which keeps MLflow and Ray consistent.
"""

from __future__ import annotations

import asyncio
import re
import weakref
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response, status
from fastapi.responses import PlainTextResponse

from service.auth import require_token
from service.cache import SweepView
from service.control import SweepControl
from service.errors import NotFound
from service.routes.deps import ControlDep, SettingsDep
from service.schemas import ParetoFront, SweepLinks, SweepOut, SweepPage, SweepStatus, TrialOut
from service.settings import Settings
from sweeps.pareto import eligible, hypervolume, pareto_front
from sweeps.spec import SweepSpec

router = APIRouter(prefix="/sweeps", tags=["sweeps"], dependencies=[Depends(require_token)])

# Running trials compete with their latest metrics: the front is live while the sweep runs.
_COMPETING = ("FINISHED", "RUNNING")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_ERRORS = {
    404: {"description": "No such sweep."},
    409: {"description": "The sweep is in the wrong state."},
    503: {"description": "Ray or MLflow is unreachable."},
}


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=SweepOut,
    responses={
        409: {"description": "Idempotency-Key reused with a different spec."},
        413: {"description": "Body too large."},
        422: {"description": "Invalid spec; each error names its field."},
        429: {"description": "Too many active sweeps."},
        503: {"description": "Ray or MLflow is unreachable; nothing was created."},
    },
)
def create_sweep(
    spec: SweepSpec,
    response: Response,
    control: ControlDep,
    settings: SettingsDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            pattern=r"^[A-Za-z0-9._:-]{1,128}$",
            description="Repeat a POST with the same key to get the same sweep back.",
        ),
    ] = None,
) -> SweepOut:
    """Record the sweep as an MLflow parent run and submit its driver as a Ray Job."""
    view, _ = control.create(spec, idempotency_key)
    response.headers["Location"] = f"/sweeps/{view.record.id}"
    return _out(view, control, settings)


class RenderedCache:
    """JSON bodies of the read endpoints, rendered once per change of the sweep cache.

    Rendering a `SweepOut` costs more than the rest of a request; under load the same bodies are
    asked for again and again between two refreshes.
    """

    def __init__(self) -> None:
        self._sweeps: weakref.WeakKeyDictionary[SweepView, bytes] = weakref.WeakKeyDictionary()
        self._pages: dict[tuple, bytes] = {}
        self._generation = -1

    def sweep(self, view: SweepView, render) -> bytes:
        body = self._sweeps.get(view)
        if body is None:
            body = self._sweeps[view] = render().model_dump_json().encode()
        return body

    def page(self, generation: int, key: tuple, render) -> bytes:
        if generation != self._generation:
            self._pages.clear()
            self._generation = generation
        body = self._pages.get(key)
        if body is None:
            body = render().model_dump_json().encode()
            if len(self._pages) < 1000:
                self._pages[key] = body
        return body


async def _rendered(request: Request) -> RenderedCache:
    return request.app.state.rendered


RenderedDep = Annotated[RenderedCache, Depends(_rendered)]


@router.get("", response_model=SweepPage, responses={503: _ERRORS[503]})
async def list_sweeps(
    control: ControlDep,
    settings: SettingsDep,
    rendered: RenderedDep,
    status_: Annotated[SweepStatus | None, Query(alias="status")] = None,
    name: Annotated[str | None, Query(max_length=200, description="Substring of the name.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> Response:
    """Sweeps, newest first, filtered by status and name."""
    await _fresh(control)
    generation = control.cache.generation
    body = rendered.page(
        generation,
        (status_, name, limit, offset),
        lambda: _page(control, settings, status_, name, limit, offset),
    )
    return Response(content=body, media_type="application/json")


def _page(
    control: SweepControl,
    settings: Settings,
    status_: str | None,
    name: str | None,
    limit: int,
    offset: int,
) -> SweepPage:
    views = control.cache.all()
    if status_ is not None:
        views = [v for v in views if v.record.status == status_]
    if name:
        needle = name.casefold()
        views = [v for v in views if needle in v.record.name.casefold()]
    page = views[offset : offset + limit]
    return SweepPage(
        items=[_out(v, control, settings) for v in page],
        total=len(views),
        limit=limit,
        offset=offset,
        next_offset=offset + limit if offset + limit < len(views) else None,
    )


@router.get(
    "/{sweep_id}", response_model=SweepOut, responses={404: _ERRORS[404], 503: _ERRORS[503]}
)
async def get_sweep(
    sweep_id: str, control: ControlDep, settings: SettingsDep, rendered: RenderedDep
) -> Response:
    """Status, trial progress, best trial so far and links to MLflow and the Ray dashboard."""
    view = await _view(control, sweep_id)
    body = rendered.sweep(view, lambda: _out(view, control, settings))
    return Response(content=body, media_type="application/json")


@router.get(
    "/{sweep_id}/trials",
    response_model=list[TrialOut],
    responses={404: _ERRORS[404], 503: _ERRORS[503]},
)
async def list_trials(sweep_id: str, control: ControlDep) -> list[TrialOut]:
    """Each trial's config, status and latest metrics."""
    view = await _view(control, sweep_id)
    return [_trial(t) for t in view.trials]


@router.get(
    "/{sweep_id}/pareto",
    response_model=ParetoFront,
    responses={
        200: {"content": {"image/png": {}}, "description": "JSON, or the plot with format=png."},
        404: {"description": "No such sweep, or no plot yet (written when the sweep ends)."},
        503: _ERRORS[503],
    },
)
async def get_pareto(
    sweep_id: str,
    control: ControlDep,
    format: Literal["json", "png"] = "json",
) -> ParetoFront | Response:
    """The Pareto front over the sweep's objectives, computed live from the trials so far."""
    view = await _view(control, sweep_id)
    if format == "png":
        png = await asyncio.to_thread(control.store.artifact, sweep_id, ".png")
        if png is None:
            raise NotFound(f"sweep {sweep_id} has no Pareto plot yet: it is written when it ends")
        return Response(content=png, media_type="image/png")
    objectives = view.record.objectives
    front = pareto_front(view.trials, objectives, _COMPETING)
    return ParetoFront(
        sweep_id=sweep_id,
        status=view.record.status,
        objectives=objectives,
        front=[_trial(t) for t in front],
        num_trials=len(eligible(view.trials, objectives, _COMPETING)),
        hypervolume=hypervolume(front, objectives) if front else None,
    )


@router.get(
    "/{sweep_id}/logs",
    response_class=PlainTextResponse,
    responses={
        200: {"content": {"text/plain": {}}, "description": "The driver's log."},
        404: {"description": "No such sweep, or its Ray job is gone."},
        503: _ERRORS[503],
    },
)
async def get_logs(
    sweep_id: str,
    control: ControlDep,
    tail: Annotated[int, Query(ge=1, le=100_000, description="Last lines to return.")] = 1000,
) -> PlainTextResponse:
    """The last lines of the sweep driver's log, from its Ray job (for a sweep that FAILED)."""
    view = await _view(control, sweep_id)
    job_id = view.record.job_id
    text = await asyncio.to_thread(control.jobs.logs, job_id) if job_id else None
    if text is None:
        raise NotFound(f"sweep {sweep_id} has no driver log on the cluster (job {job_id})")
    return PlainTextResponse("\n".join(text.splitlines()[-tail:]) + "\n")


@router.post(
    "/{sweep_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=SweepOut,
    responses=_ERRORS,
)
def cancel_sweep(sweep_id: str, control: ControlDep, settings: SettingsDep) -> SweepOut:
    """Stop the sweep gracefully: trials stop, Tune saves its state, runs end KILLED."""
    _check_id(sweep_id)
    return _out(control.cancel(sweep_id), control, settings)


@router.delete(
    "/{sweep_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=_ERRORS,
    response_class=Response,
)
def delete_sweep(sweep_id: str, control: ControlDep) -> Response:
    """Delete an ended sweep and its trials' runs (MLflow soft delete)."""
    _check_id(sweep_id)
    control.delete(sweep_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


async def _fresh(control: SweepControl) -> None:
    """Fill the cache on first use; answer 503 while MLflow is failing."""
    cache = control.cache
    if cache.refreshed_at is None:
        await asyncio.to_thread(cache.refresh)
    if cache.last_error is not None:
        raise cache.last_error


async def _view(control: SweepControl, sweep_id: str) -> SweepView:
    _check_id(sweep_id)
    await _fresh(control)
    view = control.cache.get(sweep_id)
    if view is None:
        # Created by another service process since the last refresh, or unknown.
        record = await asyncio.to_thread(control.store.get, sweep_id)
        trials = await asyncio.to_thread(control.store.trials, sweep_id)
        view = control.cache.put(record, trials)
    return view


def _check_id(sweep_id: str) -> None:
    if not _RUN_ID.match(sweep_id):
        raise NotFound(f"no sweep with id {sweep_id!r}")


def _out(view: SweepView, control: SweepControl, settings: Settings) -> SweepOut:
    record = view.record
    ui = settings.mlflow_ui_base()
    base = f"/sweeps/{record.id}"
    return SweepOut(
        id=record.id,
        name=record.name,
        experiment_id=record.experiment_id,
        status=record.status,
        message=record.message,
        created_at=record.created_at,
        ended_at=record.ended_at,
        job_id=record.job_id,
        cancel_requested=record.cancel_requested,
        progress=view.progress,
        best=view.best,
        objectives=record.objectives,
        duplicate_trials=record.duplicate_trials,
        links=SweepLinks(
            self=base,
            trials=f"{base}/trials",
            pareto=f"{base}/pareto",
            mlflow=f"{ui}/#/experiments/{record.experiment_id}/runs/{record.id}" if ui else None,
            ray_job=control.jobs.dashboard_url(record.job_id),
        ),
    )


def _trial(trial: dict) -> TrialOut:
    return TrialOut(
        id=str(trial.get("trial_id") or trial.get("run_id") or ""),
        run_id=trial.get("run_id"),
        status=str(trial.get("status") or "PENDING"),
        config=trial.get("config") or {},
        metrics=trial.get("metrics") or {},
        pareto=bool(trial.get("pareto")),
        failure_reason=trial.get("failure_reason"),
    )


__all__ = ["router"]
