"""GET /healthz: is Ray reachable, is MLflow reachable (no token needed)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.errors import BackendUnavailable
from service.routes.deps import ControlDep
from service.schemas import BackendHealth, Health

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    response_model=Health,
    responses={503: {"model": Health, "description": "Ray or MLflow is down (which is said)."}},
)
async def healthz(control: ControlDep) -> JSONResponse:
    """200 when Ray's job server and MLflow both answer, else 503 naming the one that is down."""
    ray, mlflow = await asyncio.gather(
        asyncio.to_thread(_probe, control.jobs.ping, control.jobs.address),
        asyncio.to_thread(_probe, control.store.ping, control.store.tracking_uri),
    )
    ok = ray.ok and mlflow.ok
    health = Health(status="ok" if ok else "unavailable", ray=ray, mlflow=mlflow)
    return JSONResponse(status_code=200 if ok else 503, content=health.model_dump(mode="json"))


def _probe(ping, url: str) -> BackendHealth:
    try:
        ping()
    except BackendUnavailable as exc:
        return BackendHealth(ok=False, url=url, detail=exc.message)
    return BackendHealth(ok=True, url=url)
