"""Built-in models: the L0 paper's MLP and LeNet-5-Caffe, and a small CNN for 32x32 inputs.

All are ``nn.Sequential`` chains, so a structured L0 export can shrink them
(Louizos, Welling & Kingma, "Learning Sparse Neural Networks through L0 Regularization", 2018:
MLP 784-300-100 and LeNet-5-Caffe 20-50-800-500 are its MNIST models).
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from torch import nn

from .registry import register_model

__all__ = ["CnnParams", "LeNet5Params", "MlpParams", "cnn", "lenet5", "mlp"]

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
