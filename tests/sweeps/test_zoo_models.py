"""The zoo's registry entries: parameters validated with messages that name the value and what is
allowed, any image shape or a flat square image, and ``granularity: head`` only with attention."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from sweeps.registry import MODELS, list_models
from sweeps.spec import SweepSpec
from sweeps.variants import expand
from tests.sweeps.conftest import tiny_spec

ZOO = {
    "resnet": {"depth": 8, "width": 0.25},
    "googlenet": {"width": 0.125, "blocks": 2},
    "mobilenetv2": {"width": 0.25, "stages": 3},
    "vit": {"patch": 4, "depth": 1, "heads": 2, "dim": 16},
}


def _build(name: str, params: dict, shape: tuple[int, ...], classes: int = 10) -> torch.nn.Module:
    entry = MODELS.get(name)
    return entry.factory(entry.params.model_validate(params), shape, classes)


def test_zoo_models_are_listed_with_their_parameter_schemas():
    listed = {m["name"]: m["params"]["properties"] for m in list_models()}
    assert {"layout", "depth", "width"} <= set(listed["resnet"])
    assert {"width", "blocks"} <= set(listed["googlenet"])
    assert {"width", "stages"} <= set(listed["mobilenetv2"])
    assert {"patch", "depth", "heads", "dim", "mlp_ratio"} <= set(listed["vit"])


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 8, 8), (64,)])
def test_zoo_models_take_images_of_any_shape_or_flat_squares(name, shape):
    model = _build(name, ZOO[name], shape, classes=7).eval()
    assert model(torch.randn(2, *shape)).shape == (2, 7)


def test_resnet_layouts_and_depths():
    def blocks(m: torch.nn.Module, kind: str) -> int:
        return sum(type(x).__name__ == kind for x in m.modules())

    assert blocks(_build("resnet", {"depth": 20, "width": 0.25}, (3, 32, 32)), "BasicBlock") == 9
    assert blocks(_build("resnet", {"depth": 56, "width": 0.25}, (3, 32, 32)), "BasicBlock") == 27
    r18 = _build("resnet", {"layout": "torchvision", "depth": 18, "width": 0.125}, (3, 32, 32))
    assert blocks(r18, "BasicBlock") == 8 and r18.conv1.kernel_size == (3, 3)  # small-input stem
    r50 = _build("resnet", {"layout": "torchvision", "depth": 50, "width": 0.125}, (3, 64, 64))
    assert blocks(r50, "Bottleneck") == 16 and r50.conv1.kernel_size == (7, 7)


@pytest.mark.parametrize(
    ("name", "params", "needle"),
    [
        (
            "resnet",
            {"depth": 21},
            "depth 21 is not a CIFAR ResNet depth: layout 'cifar' takes 6n + 2",
        ),
        ("resnet", {"layout": "torchvision", "depth": 20}, "layout 'torchvision' takes 18, 34, 50"),
        ("resnet", {"width": 0}, "greater than 0"),
        ("vit", {"heads": 5, "dim": 64}, "heads 5 does not divide dim 64; heads that do: [1, 2, 4"),
        ("googlenet", {"blocks": 10}, "less than or equal to 9"),
        ("mobilenetv2", {"wdith": 1.0}, "Extra inputs are not permitted"),
    ],
)
def test_bad_parameters_are_spec_errors_naming_the_value(name, params, needle):
    with pytest.raises(ValidationError, match="model") as err:
        SweepSpec.model_validate(tiny_spec(model={"name": name, "params": params}))
    assert needle in str(err.value)


def test_shapes_the_model_cannot_take_name_the_shape():
    with pytest.raises(
        ValueError, match=r"vit patch 3 does not divide the image size 8x8; .*\[1, 2, 4, 8\]"
    ):
        _build("vit", {"patch": 3, "dim": 16, "heads": 2}, (1, 8, 8))
    with pytest.raises(ValueError, match=r"flat square image .* got input shape \(40,\)"):
        _build("resnet", {}, (40,))


def test_head_granularity_needs_a_model_with_attention():
    spec = tiny_spec(model={"name": "vit", "params": ZOO["vit"]},
                     regularizer={"granularity": "head"})  # fmt: skip
    assert SweepSpec.model_validate(spec).regularizer.granularity == "head"
    for name in ("resnet", "mlp"):
        bad = tiny_spec(
            model={"name": name, "params": {}},
            regularizer={"granularity": {"grid": ["output", "head"]}},
        )
        with pytest.raises(
            ValidationError, match=f"'head' gates attention heads, and model '{name}' has none"
        ):
            SweepSpec.model_validate(bad)


def test_heads_and_mlp_units_are_gated_together_by_a_granularity_list():
    vit = {"name": "vit", "params": ZOO["vit"]}
    spec = SweepSpec.model_validate(
        tiny_spec(model=vit, regularizer={"granularity": {"grid": ["head", ["output", "head"]]}})
    )
    # A list is a set of unit kinds: kept in one order, so [output, head] and [head, output]
    # are one trial.
    assert spec.regularizer.granularity.grid == ["head", ["head", "output"]]
    names = [t["name"] for t in expand(spec, 100).trials]
    assert names == ["l0 head seed=0", "l0 head+output seed=0"]
    for bad, needle in [
        (["head", "head"], "lists each unit kind once"),
        ([], "at least 1 item"),
        (["weight", "output"], "'head' or 'output'"),
    ]:
        with pytest.raises(ValidationError, match=needle):
            SweepSpec.model_validate(tiny_spec(model=vit, regularizer={"granularity": bad}))
    with pytest.raises(ValidationError, match="'head' gates attention heads, and model 'resnet'"):
        SweepSpec.model_validate(
            tiny_spec(
                model={"name": "resnet", "params": {}},
                regularizer={"granularity": ["head", "output"]},
            )
        )
