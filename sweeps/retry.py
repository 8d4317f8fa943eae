"""Riding out MLflow outages: requests retried with backoff within a window, then a clear error.

A request that MLflow cannot serve now (connection refused or reset, timeout, a 5xx or 429
answer) is retried, with backoff from 0.5 s doubling to 10 s, for ``L0SWEEP_MLFLOW_RETRY_WINDOW_S``
(``sweeps.config``; default 300 s), then :class:`MlflowUnavailable` names MLflow, its URL, what was
being done and the time waited. A refusal (no such run, a bad value) is raised at once. The window
can be overridden for a block of code (:func:`retry_window`): the end of a run is retried until
MLflow answers (:func:`until_answered`); the service turns retries off (``retry_window(0)``).

MLflow's own retries (urllib3's, about four minutes by default) are left to the environment; a
sweep's job turns them off (``sweeps.config.mlflow_client_env``) so that the window governs.

The waits are measured and slept on a :class:`Clock` (:func:`use_clock`): the process's own, or a
test's fake one, so that tests check the window without timing a busy machine.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, Protocol, TypeVar

import requests
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient

from .config import get_settings

__all__ = [
    "Clock",
    "MlflowUnavailable",
    "RetryingClient",
    "retry_window",
    "until_answered",
    "use_clock",
    "with_retries",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Answers that mean "not now" rather than "no": MLflow's server or a proxy in front of it.
_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset(
    {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "DEADLINE_EXCEEDED", "REQUEST_LIMIT_EXCEEDED",
     "RESOURCE_EXHAUSTED"}
)  # fmt: skip
# Refused, reset, timed out, or a 5xx/429 that MLflow's own retries (urllib3's) turned into one.
_TRANSPORT_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.RetryError,
    ConnectionError,
    TimeoutError,
)
_BACKOFF_FIRST_S, _BACKOFF_MAX_S = 0.5, 10.0
_WARN_EVERY_S = 60.0
# Set by `retry_window`; None: the setting (the end of a run: until MLflow answers).
_window_override: ContextVar[float | None] = ContextVar("l0sweep_mlflow_retry_window", default=None)


class Clock(Protocol):
    """What the retries measure the window and wait on."""

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class _SystemClock:
    monotonic = staticmethod(time.monotonic)
    sleep = staticmethod(time.sleep)


_clock: Clock = _SystemClock()


@contextlib.contextmanager
def use_clock(clock: Clock) -> Iterator[Clock]:
    """Measure and wait on ``clock`` in this block, in every thread (tests: a fake clock)."""
    global _clock
    previous, _clock = _clock, clock
    try:
        yield clock
    finally:
        _clock = previous


class MlflowUnavailable(MlflowException):
    """MLflow could not serve a request for the whole retry window.

    Attributes:
        tracking_uri: the MLflow server.
        waited_s: seconds from the first failed attempt to giving up.
    """

    def __init__(
        self, tracking_uri: str, what: str, waited_s: float, window_s: float, cause: BaseException
    ) -> None:
        super().__init__(
            f"MLflow at {tracking_uri} was unavailable for {waited_s:.0f} s while trying to {what} "
            f"(retry window L0SWEEP_MLFLOW_RETRY_WINDOW_S={window_s:g} s; last error: "
            f"{_one_line(cause)})",
            error_code=TEMPORARILY_UNAVAILABLE,
        )
        self.tracking_uri = tracking_uri
        self.waited_s = waited_s


@contextlib.contextmanager
def retry_window(seconds: float) -> Iterator[None]:
    """Retry MLflow requests made in this block (this thread or task) for ``seconds``; 0: never.

    It overrides both the setting and the until-answered retries of a run's end: the service
    uses ``retry_window(0)`` so that an outage is a 503 now, not an answer minutes later.
    """
    token = _window_override.set(seconds)
    try:
        yield
    finally:
        _window_override.reset(token)


class RetryingClient:
    """An `MlflowClient` whose public methods ride out outages (see `with_retries`)."""

    def __init__(self, inner: MlflowClient) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name.startswith("_") or not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            return with_retries(
                lambda: attr(*args, **kwargs), f"call {name}", self._inner.tracking_uri
            )

        return call


def with_retries(fn: Callable[[], T], what: str, tracking_uri: str) -> T:
    """``fn()``, retried with backoff while MLflow cannot serve it, within the retry window.

    Args:
        fn: one or more MLflow requests, safe to repeat.
        what: what ``fn`` does, for the messages ("log the metrics of epoch 3 of run ...").
        tracking_uri: the server, for the messages.

    Raises:
        MlflowUnavailable: MLflow failed every attempt for the whole window.
    """
    clock = _clock
    first_failure: float | None = None
    window = 0.0
    attempt = 0
    warned_at = 0.0
    while True:
        try:
            result = fn()
        except Exception as exc:
            if not _transient(exc):
                raise
            now = clock.monotonic()
            if first_failure is None:
                first_failure = warned_at = now
                override = _window_override.get()
                window = get_settings().mlflow_retry_window_s if override is None else override
                if window <= 0:
                    raise
                limit = "until it answers" if math.isinf(window) else f"for up to {window:g} s"
                log.warning(
                    "MLflow at %s could not %s (%s); retrying %s",
                    tracking_uri, what, _one_line(exc), limit,
                )  # fmt: skip
            waited = now - first_failure
            if waited >= window:
                raise MlflowUnavailable(tracking_uri, what, waited, window, exc) from exc
            if now - warned_at >= _WARN_EVERY_S:
                warned_at = now
                log.warning("MLflow at %s: still unavailable after %.0f s", tracking_uri, waited)
            clock.sleep(min(_BACKOFF_FIRST_S * 2**attempt, _BACKOFF_MAX_S, window - waited))
            attempt += 1
        else:
            if first_failure is not None:
                log.warning(
                    "MLflow at %s answered again after %.0f s (%s)",
                    tracking_uri, clock.monotonic() - first_failure, what,
                )  # fmt: skip
            return result


def _transient(exc: BaseException) -> bool:
    """Whether ``exc`` says MLflow could not serve the request now (as opposed to refusing it)."""
    if isinstance(exc, MlflowUnavailable):
        return False  # an inner call already waited the whole window
    if isinstance(exc, RestException):
        return exc.error_code in _TRANSIENT_CODES
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return exc.response.status_code in _TRANSIENT_STATUS
    # MLflow wraps transport errors ("API request to ... failed with exception ..."): look inside.
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, _TRANSPORT_ERRORS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:500]


@contextlib.contextmanager
def until_answered() -> Iterator[None]:
    """Retry until MLflow answers in this block, unless a :func:`retry_window` is in force."""
    if _window_override.get() is not None:
        yield
        return
    with retry_window(math.inf):
        yield
