"""Built-in models: the L0 paper's MLP and LeNet-5-Caffe, a small CNN for 32x32 inputs, and the
zoo of networks labs use (ResNet, GoogLeNet, MobileNetV2, ViT; architectures in :mod:`sweeps.zoo`).

The first three are ``nn.Sequential`` chains (Louizos, Welling & Kingma, "Learning Sparse Neural
Networks through L0 Regularization", 2018: MLP 784-300-100 and LeNet-5-Caffe 20-50-800-500 are
its MNIST models); the zoo's graphs shrink through l0core's coupled groups.
"""

from __future__ import annotations

import itertools
import math
from typing import Annotated, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator
from torch import nn

from . import zoo
from .registry import register_model
from .zoo import TORCHVISION_DEPTHS

__all__ = [
    "CnnParams",
    "FromFlat",
    "GoogLeNetParams",
    "LeNet5Params",
    "MlpParams",
    "MobileNetV2Params",
    "ResNetParams",
    "ViTParams",
    "cnn",
    "googlenet",
    "lenet5",
    "mlp",
    "mobilenetv2",
    "resnet",
    "vit",
]

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    has_attention: ClassVar[bool] = False
    """Whether the model has attention heads (``granularity: head``); checked at spec time."""


class MlpParams(_Params):
    hidden: list[PositiveInt] = Field(default=[300, 100], description="Hidden layer widths.")
    activation: Literal["relu", "tanh", "gelu"] = "relu"


class LeNet5Params(_Params):
    conv_channels: tuple[PositiveInt, PositiveInt] = Field(
        default=(20, 50), description="The two conv widths."
    )
    hidden: int = Field(default=500, ge=1, description="Width of the fully connected layer.")


class CnnParams(_Params):
    channels: list[PositiveInt] = Field(
        default=[32, 64, 128], min_length=1, description="One conv-BN-ReLU-pool block per entry."
    )
    hidden: int = Field(default=256, ge=1)
    batch_norm: bool = True


@register_model("mlp", params=MlpParams)
def mlp(params: MlpParams, input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """Fully connected network on flattened inputs (784-300-100-10 in the L0 paper)."""
    widths = [math.prod(input_shape), *params.hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    for d_in, d_out in itertools.pairwise(widths):
        layers += [nn.Linear(d_in, d_out), _ACTIVATIONS[params.activation]()]
    layers.append(nn.Linear(widths[-1], num_classes))
    return nn.Sequential(*layers)


def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"{name} needs image inputs (C, H, W), got input shape {input_shape}")
    return input_shape  # type: ignore[return-value]


def _flat_features(features: nn.Module, input_shape: tuple[int, ...], name: str) -> int:
    try:
        with torch.no_grad():
            return features(torch.zeros(1, *input_shape)).numel()
    except RuntimeError as err:
        raise ValueError(f"{name} cannot take inputs of shape {input_shape}: {err}") from err


@register_model("lenet5", params=LeNet5Params)
def lenet5(params: LeNet5Params, input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """LeNet-5-Caffe: conv 20 - conv 50 - fc 800->500 - fc 500->classes (28x28 inputs)."""
    c_in = _image_shape("lenet5", input_shape)[0]
    c1, c2 = params.conv_channels
    features = nn.Sequential(
        nn.Conv2d(c_in, c1, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
    )  # fmt: skip
    flat = _flat_features(features, input_shape, "lenet5")
    return nn.Sequential(
        *features, nn.Linear(flat, params.hidden), nn.ReLU(), nn.Linear(params.hidden, num_classes)
    )


@register_model("cnn", params=CnnParams)
def cnn(params: CnnParams, input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """Small VGG-style CNN (conv-BN-ReLU-pool blocks) for 32x32 inputs such as CIFAR-10."""
    c_in = _image_shape("cnn", input_shape)[0]
    layers: list[nn.Module] = []
    for c_out in params.channels:
        layers.append(nn.Conv2d(c_in, c_out, 3, padding=1, bias=not params.batch_norm))
        if params.batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
        c_in = c_out
    layers.append(nn.Flatten())
    flat = _flat_features(nn.Sequential(*layers), input_shape, "cnn")
    layers += [nn.Linear(flat, params.hidden), nn.ReLU(), nn.Linear(params.hidden, num_classes)]
    return nn.Sequential(*layers)


# ---- the model zoo (sweeps.zoo): residual, inception, inverted-residual and transformer nets --


def _zoo_image(name: str, input_shape: tuple[int, ...]) -> tuple[tuple[int, int, int], bool]:
    """``(C, H, W)`` for a zoo network, and whether the inputs arrive flat (a square image of
    one channel, ``(H * W,)``, as an npz of flattened pixels gives)."""
    if len(input_shape) == 3:
        return input_shape, False  # type: ignore[return-value]
    if len(input_shape) == 1 and math.isqrt(input_shape[0]) ** 2 == input_shape[0]:
        side = math.isqrt(input_shape[0])
        return (1, side, side), True
    raise ValueError(
        f"{name} needs image inputs (C, H, W) or a flat square image (H * W,), got input shape "
        f"{input_shape}"
    )


class FromFlat(nn.Module):
    """Runs ``net`` on flat inputs ``(B, H * W)`` seen as one-channel images ``(B, 1, H, W)``."""

    def __init__(self, net: nn.Module, image: tuple[int, int, int]) -> None:
        super().__init__()
        self.net = net
        self.image = image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0], *self.image))


def _zoo_model(name: str, input_shape: tuple[int, ...], build) -> nn.Module:
    image, flat = _zoo_image(name, input_shape)
    net = build(image)
    return FromFlat(net, image) if flat else net


_Width = Annotated[float, Field(gt=0, le=8, description="Multiplier of every layer's width.")]


class ResNetParams(_Params):
    """``layout: cifar``: ResNet-``depth`` of He et al.'s CIFAR experiments (depth 6n + 2, stages
    of 16/32/64 channels); ``layout: torchvision``: ResNet-18/34 (BasicBlock) or 50 (Bottleneck)
    with 64-128-256-512 channels. Inputs under 64 pixels get a 3x3 stride-1 stem, no max-pool."""

    layout: Literal["cifar", "torchvision"] = "cifar"
    depth: PositiveInt = Field(default=20, description="cifar: 6n + 2; torchvision: 18, 34 or 50.")
    width: _Width = 1.0

    @model_validator(mode="after")
    def _depth_fits_layout(self) -> ResNetParams:
        if self.layout == "cifar" and (self.depth < 8 or (self.depth - 2) % 6):
            raise ValueError(
                f"depth {self.depth} is not a CIFAR ResNet depth: layout 'cifar' takes 6n + 2 "
                "(8, 14, 20, 32, 44, 56, 110, ...); layout 'torchvision' takes 18, 34 or 50"
            )
        if self.layout == "torchvision" and self.depth not in TORCHVISION_DEPTHS:
            raise ValueError(
                f"depth {self.depth} is not a torchvision ResNet: layout 'torchvision' takes "
                f"{', '.join(map(str, TORCHVISION_DEPTHS))}; layout 'cifar' takes 6n + 2"
            )
        return self


class GoogLeNetParams(_Params):
    width: _Width = 1.0
    blocks: int = Field(
        default=9, ge=1, le=9, description="Inception blocks 3a..5b to keep (9: all of them)."
    )


class MobileNetV2Params(_Params):
    width: _Width = 1.0
    stages: int = Field(default=7, ge=1, le=7, description="Inverted-residual stages to keep.")


class ViTParams(_Params):
    has_attention: ClassVar[bool] = True

    patch: PositiveInt = Field(default=4, description="Patch side; must divide the image side.")
    depth: PositiveInt = Field(default=6, description="Transformer blocks.")
    heads: PositiveInt = Field(default=3, description="Attention heads; must divide dim.")
    dim: PositiveInt = Field(default=192, description="Embedding width.")
    mlp_ratio: float = Field(default=4.0, gt=0, le=16, description="MLP hidden width / dim.")

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> ViTParams:
        if self.dim % self.heads:
            divisors = [h for h in range(1, min(self.dim, 64) + 1) if self.dim % h == 0]
            raise ValueError(
                f"heads {self.heads} does not divide dim {self.dim}; heads that do: {divisors}"
            )
        return self


@register_model("resnet", params=ResNetParams)
def resnet(params: ResNetParams, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """ResNet (He et al. 2016): CIFAR ResNet-20/32/56 or the torchvision ResNet-18/34/50 layout."""
    build = zoo.cifar_resnet if params.layout == "cifar" else zoo.resnet
    return _zoo_model(
        "resnet", input_shape, lambda s: build(params.depth, s, num_classes, params.width)
    )


@register_model("googlenet", params=GoogLeNetParams)
def googlenet(params: GoogLeNetParams, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """GoogLeNet for small images (Szegedy et al. 2015): inception blocks of four branches."""
    return _zoo_model(
        "googlenet", input_shape,
        lambda s: zoo.GoogLeNet(s, num_classes, params.width, params.blocks),
    )  # fmt: skip


@register_model("mobilenetv2", params=MobileNetV2Params)
def mobilenetv2(
    params: MobileNetV2Params, input_shape: tuple[int, ...], num_classes: int
) -> nn.Module:
    """MobileNetV2 (Sandler et al. 2018): inverted residuals with depthwise convolutions."""
    return _zoo_model(
        "mobilenetv2", input_shape,
        lambda s: zoo.MobileNetV2(s, num_classes, params.width, params.stages),
    )  # fmt: skip


@register_model("vit", params=ViTParams)
def vit(params: ViTParams, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Vision transformer (Dosovitskiy et al. 2021) with hand-written multi-head attention."""
    image, _ = _zoo_image("vit", input_shape)
    if image[1] % params.patch or image[2] % params.patch:
        raise ValueError(
            f"vit patch {params.patch} does not divide the image size {image[1]}x{image[2]}; "
            f"patches that do: {[p for p in range(1, image[1] + 1) if not image[1] % p and not image[2] % p]}"
        )
    return _zoo_model(
        "vit", input_shape,
        lambda s: zoo.ViT(s, num_classes, params.patch, params.dim, params.depth, params.heads,
                          params.mlp_ratio),
    )  # fmt: skip
