"""The FastAPI app factory: settings in, app out (no global state, so tests build their own)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.cache import SweepCache
from service.control import SweepControl
from service.errors import BackendUnavailable, install_error_handlers
from service.jobs import JobRunner
from service.record import SweepStore
from service.routes import catalog, health, sweeps
from service.settings import Settings
from sweeps.config import use_settings
from sweeps.registry import load_builtins

__all__ = ["create_app"]

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service for ``settings`` (default: read from the environment).

    Builds, never configures the process: MLflow's client settings are the start-up's
    (`sweeps.config.configure_mlflow_client`, called by ``l0sweep serve``), so that the service
    answers 503 within seconds when MLflow is down or hangs instead of retrying for minutes.

    Raises:
        PluginLoadError: an installed plugin failed to import.
        ValueError: no Ray address or MLflow tracking URI is configured, or the bind address is
            not loopback and no token is set.
    """
    settings = settings or Settings()
    if not settings.ray_address or not settings.tracking_uri:
        raise ValueError(
            "the service needs L0SWEEP_RAY_ADDRESS and L0SWEEP_TRACKING_URI; "
            "`l0sweep serve` starts an embedded Ray and MLflow when they are unset"
        )
    settings.check_bind()
    load_builtins()  # every plugin now: one that fails to import stops start-up, naming it

    store = SweepStore(settings.tracking_uri, timeout_s=settings.backend_timeout_s)
    jobs = JobRunner(
        settings.ray_address,
        python=settings.driver_python,
        tracking_uri=settings.tracking_uri,
        storage_path=settings.resolved_storage_path(),
        stop_grace_s=settings.stop_grace_s,
        dashboard=settings.ray_dashboard_url,
        mlflow_retry_window_s=settings.mlflow_retry_window_s,
        timeout_s=settings.backend_timeout_s,
    )
    control = SweepControl(
        store,
        jobs,
        SweepCache(store, finished_cache_size=settings.finished_cache_size),
        max_concurrent_sweeps=settings.max_concurrent_sweeps,
        max_resubmits=settings.max_resubmits,
        local_run_timeout_s=settings.local_run_timeout_s,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tasks = [
            asyncio.create_task(_background(control, settings)),
            asyncio.create_task(_warm(control.cache, settings)),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app = FastAPI(
        title="l0sweep",
        summary="Launch L0-sparsity sweeps on Ray, browse them in MLflow.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.control = control
    app.state.rendered = sweeps.RenderedCache()
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(SettingsInForce, settings=settings)
    app.include_router(health.router)
    app.include_router(sweeps.router)
    app.include_router(catalog.router)
    return app


async def _background(control: SweepControl, settings: Settings) -> None:
    """Refresh the sweep cache every few seconds; reconcile jobs at start-up and then periodically.

    While a look finds nothing new the next comes twice as late, up to ``refresh_backoff`` times
    ``refresh_interval_s``: an idle service costs MLflow a request every few seconds, not every
    two. Any change (a trial's metrics included) brings the interval back down.
    """
    last_reconcile = -float("inf")
    interval = settings.refresh_interval_s
    while True:
        before = control.cache.generation
        try:
            await asyncio.to_thread(control.cache.refresh)
            if control.cache.generation == before:
                ceiling = settings.refresh_interval_s * settings.refresh_backoff
                interval = min(interval * 2, ceiling)
            else:
                interval = settings.refresh_interval_s
            if time.monotonic() - last_reconcile >= settings.reconcile_interval_s:
                await asyncio.to_thread(control.reconcile)
                last_reconcile = time.monotonic()
        except BackendUnavailable as exc:
            logger.warning("background refresh: %s", exc.message)
            interval = settings.refresh_interval_s
        except Exception:
            # A bug here must not stop the refreshes for the life of the process: log, go on.
            logger.exception("background refresh failed")
            interval = settings.refresh_interval_s
        await asyncio.sleep(interval)


async def _warm(cache: SweepCache, settings: Settings) -> None:
    """Read the history into the cache's index, a page at a time, once after the start (until
    then the listing reads its pages from MLflow)."""
    while True:
        try:
            if await asyncio.to_thread(cache.warm_step):
                return
            await asyncio.sleep(0)
        except BackendUnavailable as exc:
            logger.warning("reading the sweeps' history: %s", exc.message)
            await asyncio.sleep(settings.refresh_interval_s)
        except Exception:
            logger.exception("reading the sweeps' history failed")
            await asyncio.sleep(settings.refresh_interval_s)


class SettingsInForce:
    """The app's settings in force (`sweeps.config.use_settings`) for every request and for the
    lifespan's background tasks: a spec in a request body is validated against this service's
    limits and data directory, never against whatever the process's environment says."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with use_settings(self.settings):
            await self.app(scope, receive, send)


class BodyLimit:
    """Answer 413 to a request body over ``max_bytes``, declared or streamed, before parsing it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in {"GET", "HEAD", "OPTIONS", "DELETE"}:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._too_large(send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        body = f'{{"detail":"request body over the limit of {self.max_bytes} bytes"}}'.encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
