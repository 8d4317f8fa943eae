"""Annotated dependencies shared by the routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.control import SweepControl
from service.settings import Settings

__all__ = ["ControlDep", "SettingsDep"]


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _control(request: Request) -> SweepControl:
    return request.app.state.control


SettingsDep = Annotated[Settings, Depends(_settings)]
ControlDep = Annotated[SweepControl, Depends(_control)]
