"""Augmentation of whole batches (crop with padding, flip): shapes, seeding, training batches only;
and a small real training run on an image folder from disk, augmented, end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

import sweeps.training as training
from sweeps.augment import AugmentSpec, augmenter, random_crop, random_flip
from sweeps.preflight import preflight
from sweeps.spec import SweepSpec, TrialConfig
from tests.sweeps.conftest import tiny_spec
from tests.sweeps.images_on_disk import write_class_folder


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_random_crop_shifts_each_image_within_its_padding():
    x = torch.arange(4 * 2 * 6 * 5, dtype=torch.float32).reshape(4, 2, 6, 5) + 1  # no zeros
    out = random_crop(x, 2, _gen(0))
    assert out.shape == x.shape
    assert torch.equal(out, random_crop(x, 2, _gen(0)))  # seeded
    assert not torch.equal(out, random_crop(x, 2, _gen(1)))
    for b in range(4):  # each output is the padded image seen through one window
        padded = torch.nn.functional.pad(x[b], (2, 2, 2, 2))
        windows = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(padded[:, dy : dy + 6, dx : dx + 5], out[b])
        ]
        assert len(windows) == 1, b
    assert torch.equal(random_crop(x, 0, _gen(0)), x)


def test_random_flip_mirrors_about_half_the_batch():
    x = torch.randn(400, 1, 3, 4, generator=_gen(5))
    out = random_flip(x, _gen(2))
    flipped = torch.tensor([torch.equal(o, xi.flip(2)) for o, xi in zip(out, x, strict=True)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x, strict=True)])
    assert bool((flipped ^ kept).all())
    assert 150 < int(flipped.sum()) < 250


def test_augmentation_needs_images_and_validates_its_options():
    with pytest.raises(ValueError, match=r"needs images \(C, H, W\).*'mnist1d'.*\(40,\)"):
        augmenter(AugmentSpec(crop=2, flip=False), (40,), "mnist1d")
    x = torch.ones(2, 1, 4, 4)
    assert augmenter(None, (40,), "mnist1d")(x, _gen(0)) is x  # nothing asked: nothing done
    with pytest.raises(ValidationError, match=r"dataset\.digits\.augment\.crop"):
        SweepSpec.model_validate(tiny_spec(dataset={"name": "digits", "augment": {"crop": -1}}))
    with pytest.raises(ValidationError, match=r"augment\.rotate"):
        SweepSpec.model_validate(tiny_spec(dataset={"name": "digits", "augment": {"rotate": 9}}))


def test_augmenting_data_that_are_not_images_is_refused_before_any_trial(tmp_path, monkeypatch):
    # Known at validation: the dataset's kind says it gives signals, not images.
    for name in ("mnist1d", "sparse-teacher"):
        with pytest.raises(ValidationError, match=rf"augment needs images.*{name!r} gives"):
            SweepSpec.model_validate(tiny_spec(dataset={"name": name, "augment": {"flip": True}}))
    # Known once the data load (a user's .npz): the driver's check before any trial says so.
    monkeypatch.setenv("L0SWEEP_DATA_DIR", str(tmp_path))
    np.savez(tmp_path / "flat.npz", x=np.zeros((40, 12), np.float32), y=np.arange(40) % 2)
    spec = SweepSpec.model_validate(
        tiny_spec(dataset={"name": "npz", "params": {"path": "flat.npz"}, "augment": {"crop": 2}})
    )
    problem = preflight(spec)
    assert problem is not None and "needs images (C, H, W)" in problem and "(12,)" in problem


def _cfg(**overrides):
    d = SweepSpec.model_validate(tiny_spec(**overrides)).model_dump(mode="json")
    return TrialConfig.of(
        {**{k: d[k] for k in ("model", "dataset", "regularizer", "train")}, "seed": 0}
    )


def test_training_batches_are_augmented_and_evaluation_is_not(monkeypatch):
    cfg = _cfg(
        dataset={"name": "digits", "augment": {"crop": 1, "flip": True}},
        model={"name": "cnn", "params": {"channels": [4], "hidden": 8}},
        train={"epochs": 1, "batch_size": 256},
    )
    seen: list[tuple[bool, tuple[int, ...]]] = []
    real = training.augmenter

    def spying(*args):
        apply = real(*args)
        return lambda x, g: seen.append((torch.is_grad_enabled(), tuple(x.shape))) or apply(x, g)

    monkeypatch.setattr(training, "augmenter", spying)
    a = training.train(cfg)
    n_train = len(cfg.dataset.load().train[0])
    assert len(seen) == math.ceil(n_train / 256)  # every training batch, nothing else
    assert all(grad and shape[1:] == (1, 8, 8) for grad, shape in seen)
    monkeypatch.setattr(training, "augmenter", real)
    b = training.train(cfg)
    plain = training.train(_cfg(
        model={"name": "cnn", "params": {"channels": [4], "hidden": 8}},
        train={"epochs": 1, "batch_size": 256},
    ))  # fmt: skip
    assert a.metrics["train_loss"] == b.metrics["train_loss"]  # seeded: reproducible
    assert a.metrics["train_loss"] != plain.metrics["train_loss"]  # and really applied


def test_an_image_folder_trains_end_to_end(tmp_path, monkeypatch):
    data = tmp_path / "data"
    monkeypatch.setenv("L0SWEEP_DATA_DIR", str(data))
    monkeypatch.setenv("L0SWEEP_CACHE_DIR", str(tmp_path / "cache"))
    write_class_folder(data / "pets", {"cat": 40, "dog": 40, "fox": 40}, size=(20, 14))
    write_class_folder(data / "pets", {"cat": 10, "dog": 10}, size=(16, 16), fmt="JPEG", seed=1)
    cfg = _cfg(
        dataset={
            "name": "image-folder",
            "params": {"path": "pets", "size": 16},
            "augment": {"crop": 2, "flip": True},
        },
        model={"name": "cnn", "params": {"channels": [8, 8], "hidden": 16}},
        regularizer={"kind": "l0", "granularity": "output", "lam": 0.01},
        train={"epochs": 3, "batch_size": 32, "lr": 1e-2},
    )
    result = training.train(cfg)
    assert result.metrics["val_accuracy"] >= 0.9, result.metrics
    assert result.metrics["test_accuracy"] >= 0.9, result.metrics
    assert result.shrunk is not None
    assert result.shrunk(torch.zeros(2, 3, 16, 16)).shape == (2, 3)
