"""Annotated dependencies shared by the routers.

They are ``async``: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop per
request that would cost more than the cached reads themselves.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.control import SweepControl
from service.settings import Settings

__all__ = ["ControlDep", "SettingsDep"]


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _control(request: Request) -> SweepControl:
    return request.app.state.control


SettingsDep = Annotated[Settings, Depends(_settings)]
ControlDep = Annotated[SweepControl, Depends(_control)]
