"""Errors of the service's adapters, and the one place that maps them to HTTP answers.

The record (MLflow) and jobs (Ray) adapters raise the exceptions below; routes raise nothing but
these and FastAPI's own validation errors. `install_error_handlers` turns each into a JSON body
``{"detail": ...}`` with its status code, so no client input can surface as a 500.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = [
    "BackendUnavailable",
    "Conflict",
    "NotFound",
    "ServiceError",
    "TooManySweeps",
    "Unprocessable",
    "install_error_handlers",
    "validation_details",
]

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base of the errors the service answers with its own status code."""

    status_code = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str] | None:
        return None

    def detail(self) -> Any:
        return self.message


class Unprocessable(ServiceError):
    """A spec that validates but that MLflow refuses (a tag name it cannot store, say)."""

    status_code = 422

    def __init__(self, message: str, field: str = "body") -> None:
        super().__init__(message)
        self.field = field

    def detail(self) -> list[dict[str, Any]]:
        loc = ["body", *self.field.split(".")] if self.field != "body" else ["body"]
        return [{"loc": loc, "field": self.field, "msg": self.message, "type": "mlflow_refused"}]


class NotFound(ServiceError):
    """No such sweep (or no such artifact of it)."""

    status_code = 404


class Conflict(ServiceError):
    """The sweep is in the wrong state for the request (cancel a finished one, delete a live one)."""

    status_code = 409


class TooManySweeps(ServiceError):
    """The concurrent-sweep limit is reached."""

    status_code = 429

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "30"}


class BackendUnavailable(ServiceError):
    """Ray or MLflow cannot be reached; nothing was created."""

    status_code = 503

    def __init__(self, backend: str, message: str) -> None:
        super().__init__(f"{backend} is unavailable: {message}")
        self.backend = backend

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "5"}


def validation_details(errors: list[dict[str, Any]], *, drop_body: bool = True) -> list[dict]:
    """Pydantic errors as JSON-safe dicts with a dotted ``field`` path.

    The offending ``input`` is not echoed back: it can be huge or hold NaN, which JSON cannot carry.
    """
    details = []
    for err in errors:
        loc = list(err.get("loc", ()))
        path = loc[1:] if drop_body and loc and loc[0] == "body" else loc
        msg = str(err.get("msg", "invalid value"))
        if err.get("type") == "json_invalid":
            # FastAPI's loc is ("body", character offset) and its msg only "JSON decode error".
            reason = (err.get("ctx") or {}).get("error", "")
            at = f" (at character {path[0]})" if path else ""
            msg = f"request body is not valid JSON: {reason}{at}"
            loc, path = ["body"], []
        details.append(
            {
                "loc": [p if isinstance(p, int) else str(p) for p in loc],
                "field": ".".join(str(p) for p in path) or "body",
                "msg": msg,
                "type": str(err.get("type", "value_error")),
            }
        )
    return details


def _unparsable_body(exc: BaseException | None) -> str | None:
    """Why FastAPI could not read a JSON body it answers only 'error parsing the body' for."""
    if isinstance(exc, RecursionError):
        return "request body is not valid JSON: nested too deeply to parse"
    if isinstance(exc, UnicodeDecodeError):
        return f"request body is not valid JSON: not UTF-8 ({exc.reason} at byte {exc.start})"
    if isinstance(exc, ValueError):  # e.g. an integer over Python's 4300-digit conversion limit
        return f"request body is not valid JSON: {str(exc).split(';')[0]}"
    return None


def json_safe(value: Any) -> Any:
    """Replace NaN and infinities (not JSON) with None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


class _ErrorResponse(JSONResponse):
    """JSON with non-ASCII escaped: a message quoting a lone surrogate must not fail to encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode()


def install_error_handlers(app: FastAPI) -> None:
    """Register the exception-to-status mapping on ``app``."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        if exc.status_code >= 500:
            logger.warning("%s %s: %s", request.method, request.url.path, exc.message)
        return _ErrorResponse(
            status_code=exc.status_code, content={"detail": exc.detail()}, headers=exc.headers()
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _ErrorResponse(status_code=422, content={"detail": validation_details(exc.errors())})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason = _unparsable_body(exc.__cause__) if exc.status_code == 400 else None
        if reason is not None:
            # The same answer as any other JSON FastAPI cannot decode (422, json_invalid).
            detail = [{"loc": ["body"], "field": "body", "msg": reason, "type": "json_invalid"}]
            return _ErrorResponse(status_code=422, content={"detail": detail})
        return _ErrorResponse(
            status_code=exc.status_code,
            content={"detail": json_safe(exc.detail)},
            headers=getattr(exc, "headers", None),
        )
