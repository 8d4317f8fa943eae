"""What a spec may name: GET /models, GET /datasets, GET /schema/sweep."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from service.auth import require_token
from service.schemas import RegistryEntry
from sweeps.registry import list_datasets, list_models
from sweeps.spec import json_schema

router = APIRouter(tags=["catalog"], dependencies=[Depends(require_token)])


@router.get("/models", response_model=list[RegistryEntry])
async def models() -> list[dict[str, Any]]:
    """The registered models, each with the JSON Schema of its parameters."""
    return list_models()


@router.get("/datasets", response_model=list[RegistryEntry])
async def datasets() -> list[dict[str, Any]]:
    """The registered datasets, each with the JSON Schema of its parameters."""
    return list_datasets()


@router.get("/schema/sweep")
async def sweep_schema() -> dict[str, Any]:
    """The JSON Schema of a sweep spec (the body of POST /sweeps)."""
    return json_schema()
