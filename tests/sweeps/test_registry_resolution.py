"""The spec resolves the registries when it validates, not when it is imported: a model or
dataset registered after ``sweeps.spec`` was imported is accepted, checked and published."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from sweeps import registry
from sweeps.registry import DATASETS, MODELS
from sweeps.spec import SweepSpec, json_schema
from tests.sweeps.conftest import tiny_spec


class _WidthParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: int = 4


@pytest.fixture
def late_model(monkeypatch: pytest.MonkeyPatch) -> str:
    """A model registered now, long after ``sweeps.spec`` was imported; removed afterwards."""
    name = "late-net"
    MODELS.names()  # the registry loaded, as in a running process
    monkeypatch.setattr(MODELS, "_entries", dict(MODELS._entries))

    @MODELS.register(name, params=_WidthParams)
    def late_net(params: _WidthParams, input_shape, num_classes):  # pragma: no cover - not built
        raise AssertionError("validation builds nothing")

    return name


@pytest.mark.fast
def test_a_model_registered_after_import_is_accepted(late_model):
    assert late_model in MODELS.names()
    spec = SweepSpec.model_validate(tiny_spec(model={"name": late_model, "params": {"width": 8}}))
    assert spec.model.name == late_model and spec.model.params.width == 8
    assert spec.model_dump(mode="json")["model"] == {"name": late_model, "params": {"width": 8}}


@pytest.mark.fast
def test_its_params_are_checked_with_field_paths(late_model):
    with pytest.raises(ValidationError) as info:
        SweepSpec.model_validate(tiny_spec(model={"name": late_model, "params": {"width": "x"}}))
    locs = [".".join(map(str, e["loc"])) for e in info.value.errors()]
    assert locs == [f"model.{late_model}.params.width"], locs


@pytest.mark.fast
def test_it_is_published_in_the_json_schema(late_model):
    text = str(json_schema())
    assert late_model in text and "width" in text


@pytest.mark.fast
def test_an_unknown_name_lists_the_registered_ones():
    with pytest.raises(ValidationError) as info:
        SweepSpec.model_validate(tiny_spec(model={"name": "no-such-net"}))
    text = str(info.value)
    assert "no-such-net" in text and "'mlp'" in text, text


@pytest.mark.fast
def test_a_dataset_registered_after_import_is_accepted(monkeypatch: pytest.MonkeyPatch):
    DATASETS.names()
    monkeypatch.setattr(DATASETS, "_entries", dict(DATASETS._entries))
    DATASETS.register("late-data")(lambda params: None)
    spec = SweepSpec.model_validate(tiny_spec(dataset={"name": "late-data", "val_fraction": 0.2}))
    assert spec.dataset.name == "late-data" and spec.dataset.val_fraction == 0.2
    assert registry.DATASETS.get("late-data").name == "late-data"
