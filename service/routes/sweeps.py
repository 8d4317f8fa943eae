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
from sweeps.vocabulary import TrialStatus

router = APIRouter(prefix="/sweeps", tags=["sweeps"], dependencies=[Depends(require_token)])

# Running trials compete with their latest metrics: the front is live while the sweep runs.
_COMPETING = (TrialStatus.FINISHED, TrialStatus.RUNNING)
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
    """JSON bodies of the read endpoints, rendered once per change of what they show.

    Rendering a `SweepOut` costs more than the rest of a request; under load the same bodies are
    asked for again and again between two refreshes. A sweep's bodies (its view, trials and front)
    live as long as the view they were rendered from; the listing's pages until the cache's
    generation changes.
    """

    def __init__(self) -> None:
        self._bodies: dict[str, weakref.WeakKeyDictionary[SweepView, bytes]] = {
            kind: weakref.WeakKeyDictionary() for kind in ("sweep", "trials", "pareto")
        }
        self._pages: dict[tuple, bytes] = {}
        self._generation = -1

    def of(self, kind: str, view: SweepView, render) -> bytes:
        """The body of ``kind`` for ``view``; ``render()`` returns a model or a list of them."""
        bodies = self._bodies[kind]
        body = bodies.get(view)
        if body is None:
            body = bodies[view] = _json(render())
        return body

    def page(self, generation: int, key: tuple) -> bytes | None:
        if generation != self._generation:
            self._pages.clear()
            self._generation = generation
        return self._pages.get(key)

    def keep_page(self, generation: int, key: tuple, body: bytes) -> None:
        if generation == self._generation and len(self._pages) < 1000:
            self._pages[key] = body


def _json(value) -> bytes:
    if isinstance(value, list):
        return b"[" + b",".join(v.model_dump_json().encode() for v in value) + b"]"
    return value.model_dump_json().encode()


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
    """Sweeps, newest first, filtered by status and name.

    ``total`` is null for a few seconds after the service starts, while it reads the history.
    """
    await _fresh(control)
    cache = control.cache
    generation = cache.generation
    key = (status_, name, limit, offset)
    body = rendered.page(generation, key)
    if body is None:
        views, total, more = await asyncio.to_thread(cache.page, status_, name, limit, offset)
        page = SweepPage(
            items=[_out(v, control, settings) for v in views],
            total=total,
            limit=limit,
            offset=offset,
            next_offset=offset + limit if more else None,
        )
        body = page.model_dump_json().encode()
        rendered.keep_page(generation, key, body)
    return Response(content=body, media_type="application/json")


@router.get(
    "/{sweep_id}", response_model=SweepOut, responses={404: _ERRORS[404], 503: _ERRORS[503]}
)
async def get_sweep(
    sweep_id: str, control: ControlDep, settings: SettingsDep, rendered: RenderedDep
) -> Response:
    """Status, trial progress, best trial so far and links to MLflow and the Ray dashboard."""
    view = await _view(control, sweep_id)
    body = rendered.of("sweep", view, lambda: _out(view, control, settings))
    return Response(content=body, media_type="application/json")


@router.get(
    "/{sweep_id}/trials",
    response_model=list[TrialOut],
    responses={404: _ERRORS[404], 503: _ERRORS[503]},
)
async def list_trials(sweep_id: str, control: ControlDep, rendered: RenderedDep) -> Response:
    """Each trial's config, status and latest metrics."""
    view = await _view(control, sweep_id, trials=True)
    body = rendered.of("trials", view, lambda: [TrialOut.of(t) for t in view.trials])
    return Response(content=body, media_type="application/json")


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
    rendered: RenderedDep,
    format: Literal["json", "png"] = "json",
) -> Response:
    """The Pareto front over the sweep's objectives, computed live from the trials so far."""
    view = await _view(control, sweep_id, trials=format == "json")
    if format == "png":
        png = await asyncio.to_thread(control.store.artifact, sweep_id, ".png")
        if png is None:
            raise NotFound(f"sweep {sweep_id} has no Pareto plot yet: it is written when it ends")
        return Response(content=png, media_type="image/png")
    body = rendered.of("pareto", view, lambda: _pareto(view))
    return Response(content=body, media_type="application/json")


def _pareto(view: SweepView) -> ParetoFront:
    objectives = view.record.objectives
    trials = view.trials or []
    front = pareto_front(trials, objectives, _COMPETING)
    return ParetoFront(
        sweep_id=view.record.id,
        status=view.record.status,
        objectives=objectives,
        front=[TrialOut.of(t) for t in front],
        num_trials=len(eligible(trials, objectives, _COMPETING)),
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
    """Follow the active sweeps from the first request on; answer 503 while MLflow is failing."""
    cache = control.cache
    if cache.refreshed_at is None:
        await asyncio.to_thread(cache.ensure_fresh)
    if cache.last_error is not None:
        raise cache.last_error


async def _view(control: SweepControl, sweep_id: str, trials: bool = False) -> SweepView:
    """The sweep from the cache; read from MLflow (and then kept) when it is not held, or when
    ``trials`` are asked for and not held."""
    _check_id(sweep_id)
    await _fresh(control)
    view = control.cache.get(sweep_id)
    if view is None or not view.showable or (trials and view.trials is None):
        read = control.cache.with_trials if trials else control.cache.view
        view = await asyncio.to_thread(read, sweep_id)
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


__all__ = ["router"]
