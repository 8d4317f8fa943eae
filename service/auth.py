"""Bearer-token authentication (constant-time comparison).

With no token configured (allowed on loopback only, see `Settings.check_bind`) every request
passes. The token is never logged: only the fact that a request was refused.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

__all__ = ["require_token"]

_bearer = HTTPBearer(auto_error=False, description="The service's L0SWEEP_TOKEN.")


async def require_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Reject the request with 401 unless it carries the configured bearer token."""
    expected = request.app.state.settings.token
    if expected is None:
        return
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="missing or invalid bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )
