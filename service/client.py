"""A typed Python client for the l0sweep REST API (the CLI uses it).

>>> from service.client import Client
>>> with Client("http://127.0.0.1:8000") as api:           # doctest: +SKIP
...     sweep = api.submit(spec)                             # SweepSpec or a dict
...     sweep = api.wait(sweep.id)                           # until FINISHED/FAILED/CANCELLED
...     front = api.pareto(sweep.id)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from service.schemas import TERMINAL, Health, ParetoFront, SweepOut, SweepPage, TrialOut

__all__ = ["ApiError", "Client"]


class ApiError(Exception):
    """The service answered with an error status; ``detail`` is its explanation."""

    def __init__(self, status_code: int, detail: Any) -> None:
        self.status_code = status_code
        self.detail = detail
        super().__init__(f"{status_code}: {_describe(detail)}")


class Client:
    """The REST API as typed methods.

    Args:
        base_url: where the service listens, e.g. ``http://127.0.0.1:8000``.
        token: the service's bearer token, when it has one.
        timeout_s: per-request timeout.
    """

    def __init__(self, base_url: str, token: str | None = None, timeout_s: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def submit(self, spec: Any, idempotency_key: str | None = None) -> SweepOut:
        """POST a spec (a `SweepSpec`, or a dict as read from YAML/JSON)."""
        body = spec.model_dump(mode="json") if hasattr(spec, "model_dump") else spec
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return SweepOut.model_validate(self._request("POST", "/sweeps", json=body, headers=headers))

    def list(
        self, status: str | None = None, name: str | None = None, limit: int = 50, offset: int = 0
    ) -> SweepPage:
        params = {"limit": limit, "offset": offset}
        if status:
            params["status"] = status
        if name:
            params["name"] = name
        return SweepPage.model_validate(self._request("GET", "/sweeps", params=params))

    def get(self, sweep_id: str) -> SweepOut:
        return SweepOut.model_validate(self._request("GET", f"/sweeps/{sweep_id}"))

    def trials(self, sweep_id: str) -> list[TrialOut]:
        return [
            TrialOut.model_validate(t) for t in self._request("GET", f"/sweeps/{sweep_id}/trials")
        ]

    def pareto(self, sweep_id: str) -> ParetoFront:
        return ParetoFront.model_validate(self._request("GET", f"/sweeps/{sweep_id}/pareto"))

    def pareto_png(self, sweep_id: str) -> bytes:
        response = self._send("GET", f"/sweeps/{sweep_id}/pareto", params={"format": "png"})
        return response.content

    def logs(self, sweep_id: str, tail: int = 1000) -> str:
        """The last ``tail`` lines of the sweep driver's log."""
        return self._send("GET", f"/sweeps/{sweep_id}/logs", params={"tail": tail}).text

    def cancel(self, sweep_id: str) -> SweepOut:
        return SweepOut.model_validate(self._request("POST", f"/sweeps/{sweep_id}/cancel"))

    def delete(self, sweep_id: str) -> None:
        self._send("DELETE", f"/sweeps/{sweep_id}")

    def health(self) -> Health:
        """The health report; a 503 (Ray or MLflow down) is returned, not raised."""
        response = self._http.get("/healthz")
        if response.status_code not in (200, 503):
            raise ApiError(response.status_code, _detail(response))
        return Health.model_validate(response.json())

    def models(self) -> list[dict[str, Any]]:
        return self._request("GET", "/models")

    def datasets(self) -> list[dict[str, Any]]:
        return self._request("GET", "/datasets")

    def schema(self) -> dict[str, Any]:
        return self._request("GET", "/schema/sweep")

    def wait(
        self,
        sweep_id: str,
        poll_s: float = 2.0,
        timeout_s: float | None = None,
        on_update: Callable[[SweepOut], None] | None = None,
    ) -> SweepOut:
        """Poll until the sweep ends; ``on_update`` sees every poll (for progress bars).

        Raises:
            TimeoutError: the sweep had not ended after ``timeout_s``.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            sweep = self.get(sweep_id)
            if on_update is not None:
                on_update(sweep)
            if sweep.status in TERMINAL:
                return sweep
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"sweep {sweep_id} is still {sweep.status} after {timeout_s} s")
            time.sleep(poll_s)

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise ApiError(response.status_code, _detail(response))
        return response

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._send(method, path, **kwargs).json()


def _detail(response: httpx.Response) -> Any:
    try:
        data = response.json()
    except ValueError:
        return response.text
    return data.get("detail", data) if isinstance(data, dict) else data


def _describe(detail: Any) -> str:
    """Validation errors as ``field: message`` lines; anything else as text."""
    if isinstance(detail, list):
        return "; ".join(
            f"{d.get('field', '?')}: {d.get('msg', '')}" if isinstance(d, dict) else str(d)
            for d in detail
        )
    return str(detail)
