"""Data augmentation of whole training batches on the trial's device: random crop with padding
and horizontal flip, the standard recipe for CIFAR-style training (He et al. 2016, Sec. 4.2).

Each function takes a batch ``(B, C, H, W)`` already on the device and a ``torch.Generator`` on
the same device, and draws one random number per example for the whole batch at once: no Python
loop over examples, no host-device copies. The trial seeds the generator per epoch, so a trial's
augmentation is reproducible and a resumed trial draws what the uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import Field

from .domains import _Strict

__all__ = ["AugmentSpec", "augmenter", "random_crop", "random_flip"]


class AugmentSpec(_Strict):
    """Augmentation of the training batches (never of validation or test)."""

    crop: int = Field(
        default=0,
        ge=0,
        le=64,
        description="Pad each side with this many zero pixels (the mean, after standardising), "
        "then crop back to the image's size at a random offset; 0: no crop.",
    )
    flip: bool = Field(default=False, description="Mirror left-right with probability 0.5.")


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Crop each image of ``x`` (B, C, H, W) at a random offset from its zero-padded copy.

    Returns:
        A tensor of the shape of ``x``.
    """
    if padding == 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))  # (B, C, H+2p, W+2p)
    offsets = torch.randint(
        0, 2 * padding + 1, (2, b), generator=generator, device=x.device
    )  # (2, B): the top and left edge of each crop
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (B, W)
    padded_w = w + 2 * padding
    picked_rows = padded.gather(2, rows[:, None, :, None].expand(b, c, h, padded_w))
    return picked_rows.gather(3, cols[:, None, None, :].expand(b, c, h, w))  # (B, C, H, W)


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image of ``x`` (B, C, H, W) left-right with probability 0.5."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def augmenter(
    spec: AugmentSpec | None, input_shape: tuple[int, ...], dataset: str
) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """The function a trial applies to each training batch (the identity when nothing is on).

    Args:
        spec: the dataset's ``augment`` section, or None.
        input_shape: one example's shape; augmentation needs images (C, H, W).
        dataset: the dataset's name, for the error message.

    Raises:
        ValueError: augmentation is asked of inputs that are not images.
    """
    options = spec if spec is not None else AugmentSpec()
    if options.crop == 0 and not options.flip:
        return _unchanged
    if len(input_shape) != 3:
        raise ValueError(
            f"dataset.augment needs images (C, H, W), but dataset {dataset!r} gives inputs of "
            f"shape {tuple(input_shape)}; remove augment or use an image dataset"
        )

    def apply(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = random_crop(x, options.crop, generator)
        return random_flip(x, generator) if options.flip else x

    return apply


def _unchanged(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x
