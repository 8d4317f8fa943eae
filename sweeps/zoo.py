"""Model families that are not chains, written in torchvision's layout (BatchNorm as module
attributes, ``downsample`` branches), with stems adapted to small inputs.

* ResNet (He et al., 2016): CIFAR ResNet-20/32/56 (three stages of 16/32/64 channels, 6n+2
  layers) and the ImageNet layouts ResNet-18/34 (``BasicBlock``) and ResNet-50 (``Bottleneck``).
* GoogLeNet (Szegedy et al., 2015), the small CIFAR variant: inception blocks that concatenate a
  1x1, a 3x3 after a 1x1 reduce, a 5x5 after a 1x1 reduce, and a pooled 1x1 branch.
* MobileNetV2 (Sandler et al., 2018): inverted residuals with depthwise convolutions.
* ViT (Dosovitskiy et al., 2021): patch embedding, pre-norm blocks with one qkv ``Linear``, heads
  by reshape and ``F.scaled_dot_product_attention``, and a GELU MLP.

torchvision's wheel does not load with the CPU build of torch on these machines, so the layouts
are written out here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TORCHVISION_DEPTHS", "BasicBlock", "Bottleneck", "GoogLeNet", "MobileNetV2", "ResNet",
           "ViT", "cifar_resnet", "resnet"]  # fmt: skip


def _image(input_shape: tuple[int, ...], name: str) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"{name} needs image inputs (C, H, W), got input shape {input_shape}")
    return tuple(input_shape)  # type: ignore[return-value]


def _width(x: float, width: float, divisor: int = 1) -> int:
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width!r}")
    return max(divisor, round(x * width / divisor) * divisor)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual (torchvision's ``BasicBlock``)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) with a residual (torchvision's ``Bottleneck``)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A ResNet in torchvision's layout: ``conv1``/``bn1`` stem, ``layer1..N``, ``fc``.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage.
        widths: channels of each stage (before the block's expansion).
        input_shape: (C, H, W); inputs under 64 pixels get a 3x3 stride-1 stem without max-pool.
        num_classes: outputs.
    """

    def __init__(self, block, layers, widths, input_shape, num_classes: int) -> None:
        super().__init__()
        c, h, w = _image(input_shape, "resnet")
        if len(layers) != len(widths):
            raise ValueError(f"layers {layers} and widths {widths} must have the same length")
        self.inplanes = widths[0]
        small = min(h, w) < 64
        k, s = (3, 1) if small else (7, 2)
        self.conv1 = nn.Conv2d(c, widths[0], k, s, k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small else nn.MaxPool2d(3, 2, 1)
        for i, (n, width) in enumerate(zip(layers, widths, strict=True)):
            stage = self._make_layer(block, width, n, stride=1 if i == 0 else 2)
            self.add_module(f"layer{i + 1}", stage)
        self.n_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.n_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


_RESNETS = {18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]),
            50: (Bottleneck, [3, 4, 6, 3])}  # fmt: skip
TORCHVISION_DEPTHS = tuple(_RESNETS)


def resnet(depth: int, input_shape, num_classes: int, width: float = 1.0) -> ResNet:
    """ResNet-18/34/50 (ImageNet layouts; ``width`` scales 64-128-256-512)."""
    if depth not in _RESNETS:
        raise ValueError(f"resnet depth must be one of {sorted(_RESNETS)}, got {depth!r}")
    block, layers = _RESNETS[depth]
    widths = [_width(c, width) for c in (64, 128, 256, 512)]
    return ResNet(block, layers, widths, input_shape, num_classes)


def cifar_resnet(depth: int, input_shape, num_classes: int, width: float = 1.0) -> ResNet:
    """CIFAR ResNet-20/32/56/...: ``depth = 6n + 2``, stages of 16/32/64 channels (x ``width``),
    1x1 convolution shortcuts where the shape changes."""
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, 56, ...), got {depth!r}")
    n = (depth - 2) // 6
    widths = [_width(c, width) for c in (16, 32, 64)]
    return ResNet(BasicBlock, [n] * 3, widths, input_shape, num_classes)


class BasicConv2d(nn.Module):
    """Conv, BatchNorm, ReLU (torchvision's GoogLeNet building block)."""

    def __init__(self, c_in: int, c_out: int, **kw) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, bias=False, **kw)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class Inception(nn.Module):
    """Four branches concatenated: 1x1; 1x1 then 3x3; 1x1 then 5x5; 3x3 max-pool then 1x1."""

    def __init__(self, c_in, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj) -> None:
        super().__init__()
        self.branch1 = BasicConv2d(c_in, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(BasicConv2d(c_in, ch3x3red, kernel_size=1),
                                     BasicConv2d(ch3x3red, ch3x3, kernel_size=3, padding=1))  # fmt: skip
        self.branch3 = nn.Sequential(BasicConv2d(c_in, ch5x5red, kernel_size=1),
                                     BasicConv2d(ch5x5red, ch5x5, kernel_size=5, padding=2))  # fmt: skip
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), BasicConv2d(c_in, pool_proj, kernel_size=1))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


# (ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj) of GoogLeNet's inception blocks
_INCEPTION = {"3a": (64, 96, 128, 16, 32, 32), "3b": (128, 128, 192, 32, 96, 64),
              "4a": (192, 96, 208, 16, 48, 64), "4b": (160, 112, 224, 24, 64, 64),
              "4c": (128, 128, 256, 24, 64, 64), "4d": (112, 144, 288, 32, 64, 64),
              "4e": (256, 160, 320, 32, 128, 128), "5a": (256, 160, 320, 32, 128, 128),
              "5b": (384, 192, 384, 48, 128, 128)}  # fmt: skip


class GoogLeNet(nn.Module):
    """GoogLeNet for small inputs: a 3x3 stem and inception blocks 3a-5b (``blocks`` of them,
    default all nine) with max-pools after 3b and 4e; channels scaled by ``width``."""

    def __init__(self, input_shape, num_classes: int, width: float = 1.0, blocks: int = 9) -> None:
        super().__init__()
        c, _, _ = _image(input_shape, "googlenet")
        if not 1 <= blocks <= len(_INCEPTION):
            raise ValueError(f"googlenet blocks must be in [1, {len(_INCEPTION)}], got {blocks!r}")
        stem = _width(192, width)
        self.pre_layers = BasicConv2d(c, stem, kernel_size=3, padding=1)
        layers: list[nn.Module] = []
        c_in = stem
        for i, (name, chans) in enumerate(list(_INCEPTION.items())[:blocks]):
            ch = [_width(v, width) for v in chans]
            block = Inception(c_in, *ch)
            layers.append(block)
            self.add_module(f"inception{name}", block)
            c_in = ch[0] + ch[2] + ch[4] + ch[5]
            if name in ("3b", "4e") and i < blocks - 1:
                layers.append(nn.MaxPool2d(3, 2, 1))
        self.body = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.body(self.pre_layers(x))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


class ConvBNReLU6(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, k: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 linear projection; a residual when shapes match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.use_res_connect = stride == 1 and c_in == c_out
        layers: list[nn.Module] = [ConvBNReLU6(c_in, hidden, 1)] if expand != 1 else []
        layers += [ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]  # fmt: skip
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


# (expansion t, channels c, repeats n, stride s) of MobileNetV2
_MOBILENET = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
              (6, 160, 3, 2), (6, 320, 1, 1)]  # fmt: skip


class MobileNetV2(nn.Module):
    """MobileNetV2 (``features``, ``classifier``); for inputs under 64 pixels the stem and the
    second stage keep stride 1 (the usual CIFAR adaptation). ``stages`` truncates the network."""

    def __init__(self, input_shape, num_classes: int, width: float = 1.0, stages: int = 7) -> None:
        super().__init__()
        c, h, w = _image(input_shape, "mobilenet_v2")
        if not 1 <= stages <= len(_MOBILENET):
            raise ValueError(f"mobilenet_v2 stages must be in [1, 7], got {stages!r}")
        small = min(h, w) < 64
        c_in = _width(32, width, 8)
        features: list[nn.Module] = [ConvBNReLU6(c, c_in, 3, 1 if small else 2)]
        for i, (t, ch, n, s) in enumerate(_MOBILENET[:stages]):
            c_out = _width(ch, width, 8)
            for j in range(n):
                stride = s if j == 0 and not (small and i == 1) else 1
                features.append(InvertedResidual(c_in, c_out, stride, t))
                c_in = c_out
        last = _width(1280, max(1.0, width), 8)
        features.append(ConvBNReLU6(c_in, last, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


class Attention(nn.Module):
    """Multi-head self-attention: one qkv ``Linear``, heads by reshape, SDPA, a projection."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads {num_heads!r} must divide dim {dim!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim) each
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision transformer: patch embedding, a class token, learned positions, pre-norm blocks."""

    def __init__(self, input_shape, num_classes: int, patch: int = 4, dim: int = 192,
                 depth: int = 6, heads: int = 3, mlp_ratio: float = 4.0) -> None:  # fmt: skip
        super().__init__()
        c, h, w = _image(input_shape, "vit")
        if patch < 1 or h % patch or w % patch:
            raise ValueError(f"patch {patch!r} must divide the image size {h}x{w}")
        if heads < 1 or dim % heads:
            raise ValueError(f"heads {heads!r} must divide dim {dim!r}")
        self.patch_embed = nn.Conv2d(c, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (h // patch) * (w // patch) + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])
