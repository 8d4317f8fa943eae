"""Image datasets from real files the tests write: class folders of PNG/JPEG, CIFAR python batch
folders, IDX files fitted to 32x32 RGB; bad input as spec errors naming the path and the problem."""

from __future__ import annotations

import os
import pickle

import numpy as np
import PIL.Image
import pytest
from pydantic import ValidationError

import sweeps.images as images
from sweeps.data import load_dataset
from sweeps.registry import DATASETS, list_datasets
from sweeps.spec import SweepSpec
from tests.sweeps.conftest import tiny_spec
from tests.sweeps.images_on_disk import (
    cifar_rows,
    write_cifar10,
    write_cifar100,
    write_class_folder,
    write_idx_folder,
)


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """A data directory (and a cache directory) of the test's own."""
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setenv("L0SWEEP_DATA_DIR", str(root))
    monkeypatch.setenv("L0SWEEP_CACHE_DIR", str(tmp_path / "cache"))
    return root


def _raw(name, **params):
    entry = DATASETS.get(name)
    return entry.factory(entry.params.model_validate(params))


def _spec_error(dataset: dict) -> str:
    with pytest.raises(ValidationError) as info:
        SweepSpec.model_validate(tiny_spec(dataset=dataset))
    return str(info.value)


def test_the_image_datasets_are_registered_with_schemas():
    listed = {d["name"]: d for d in list_datasets()}
    assert {"image-folder", "cifar10", "cifar100"} <= set(listed)
    assert {"path", "size", "channels", "test_path"} <= set(
        listed["image-folder"]["params"]["properties"]
    )
    assert {"size", "fit", "channels"} <= set(listed["fashion-mnist"]["params"]["properties"])
    schema = SweepSpec.model_json_schema()
    augment = schema["$defs"]["AugmentSpec"]["properties"]
    assert set(augment) == {"crop", "flip"}


def test_image_folder_decodes_png_and_jpeg_in_class_order(data_dir):
    write_class_folder(data_dir / "pets", {"dog": 3, "cat": 2}, size=(12, 10))
    write_class_folder(data_dir / "pets", {"fox": 2}, size=(12, 10), fmt="JPEG")
    raw = _raw("image-folder", path="pets")
    assert raw.x.shape == (7, 3, 10, 12) and raw.x.dtype == np.uint8
    assert raw.info["classes"] == ["cat", "dog", "fox"] and raw.num_classes == 3
    assert raw.y.tolist() == [0, 0, 1, 1, 1, 2, 2]
    # The colours survive decoding: red cats, blue dogs, green foxes (JPEG: lossy, roughly).
    mean_rgb = raw.x.reshape(7, 3, -1).mean(axis=2)
    assert mean_rgb[0].argmax() == 0 and mean_rgb[2].argmax() == 2 and mean_rgb[5].argmax() == 1
    grey = _raw("image-folder", path="pets", size=[8, 6], channels=1)
    assert grey.x.shape == (7, 1, 8, 6)


def test_image_folder_is_decoded_once_and_again_when_it_changes(data_dir, monkeypatch):
    files = write_class_folder(data_dir / "pets", {"cat": 2, "dog": 2}, size=(8, 8))
    decoded = []
    real_decode_all = images._decode_all
    monkeypatch.setattr(
        images, "_decode_all", lambda *a: decoded.append(a[0].label) or real_decode_all(*a)
    )
    first = _raw("image-folder", path="pets", size=16)
    second = _raw("image-folder", path="pets", size=16)  # as another process would: from cache
    assert decoded == ["pets"] and np.array_equal(first.x, second.x)
    assert len(list((data_dir.parent / "cache" / "image-folder").glob("*.npy"))) == 1
    _raw("image-folder", path="pets")  # own size: the headers are read once, and recorded
    images._common_size.cache_clear()  # a new process: neither headers nor pixels are read
    with monkeypatch.context() as m:
        m.setattr(PIL.Image, "open", lambda *a, **k: pytest.fail("an image was opened"))
        assert np.array_equal(_raw("image-folder", path="pets").x.shape, (4, 3, 8, 8))
        SweepSpec.model_validate(
            tiny_spec(dataset={"name": "image-folder", "params": {"path": "pets"}})
        )
    decoded.clear()
    write_class_folder(data_dir / "pets", {"cat": 2}, size=(8, 8), seed=1)  # same names, new pixels
    os.utime(files[0], ns=(1, 1))  # a different modification time even on a coarse clock
    third = _raw("image-folder", path="pets", size=16)
    assert decoded == ["pets"] and not np.array_equal(first.x, third.x)


def test_image_folder_test_path_maps_its_classes_to_the_training_ones(data_dir):
    write_class_folder(data_dir / "train", {"cat": 3, "dog": 3, "fox": 3})
    write_class_folder(data_dir / "test", {"dog": 2, "fox": 1})
    d = load_dataset("image-folder", {"path": "train", "test_path": "test"})
    assert d.test[1].tolist() == [1, 1, 2] and d.num_classes == 3
    assert d.input_shape == (3, 10, 12)
    write_class_folder(data_dir / "zoo", {"cat": 1, "dog": 1})
    (data_dir / "zoo" / "wolf").mkdir()
    write_class_folder(data_dir / "zoo" / "wolf", {"fox": 1})  # a wolf class, fox-coloured
    msg = _spec_error({"name": "image-folder", "params": {"path": "train", "test_path": "zoo"}})
    assert "test folder 'zoo' has classes that 'train' lacks: ['wolf']" in msg


def test_images_are_standardised_per_channel_with_training_statistics(data_dir):
    write_class_folder(data_dir / "pets", {"cat": 20, "dog": 20})
    d = load_dataset("image-folder", {"path": "pets"}, val_fraction=0.2, test_fraction=0.2)
    per_channel = d.train[0].mean(dim=(0, 2, 3))
    assert per_channel.abs().max() < 1e-4
    assert d.train[0].std(dim=(0, 2, 3)).sub(1).abs().max() < 1e-3


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"path": "../outside"}, "must not contain '..'"),
        ({"path": "/etc"}, "must be relative to the data directory"),
        ({"path": "nul\x00"}, "contains a NUL character"),
        ({"path": "escape"}, "outside the data directory"),
        ({"path": "linked-class"}, "outside the data directory"),
        ({"path": "linked-image"}, "outside the data directory"),
        ({"path": "nothing-here"}, "'nothing-here'"),
        ({"path": "empty"}, "has no class sub-folders"),
        ({"path": "no-dogs"}, "class folder 'dog' has no images"),
        ({"path": "one-class"}, "a classifier needs at least two"),
        ({"path": "mixed"}, "holds images of different sizes"),
        ({"path": "not-an-image"}, "'dog/fake.png' cannot be read as an image"),
        ({"path": "pets", "test_path": "mixed"}, "holds images of different sizes"),
    ],
    ids=lambda v: v if isinstance(v, str) else v["path"],
)
def test_bad_image_folders_are_spec_errors_naming_path_and_problem(
    data_dir, tmp_path, params, expected
):
    outside = tmp_path / "outside"
    write_class_folder(outside, {"cat": 1, "dog": 1})
    write_class_folder(data_dir / "pets", {"cat": 2, "dog": 2})
    (data_dir / "escape").symlink_to(outside)
    write_class_folder(data_dir / "linked-class", {"cat": 1})
    (data_dir / "linked-class" / "dog").symlink_to(outside / "dog")
    write_class_folder(data_dir / "linked-image", {"cat": 1, "dog": 1})
    (data_dir / "linked-image" / "dog" / "x.png").symlink_to(outside / "dog" / "000.png")
    (data_dir / "empty").mkdir()
    (data_dir / "empty" / "stray.png").write_bytes(b"")
    write_class_folder(data_dir / "no-dogs", {"cat": 2})
    (data_dir / "no-dogs" / "dog").mkdir()
    (data_dir / "no-dogs" / "dog" / "notes.txt").write_text("no images here")
    write_class_folder(data_dir / "one-class", {"cat": 2})
    write_class_folder(data_dir / "mixed", {"cat": 2}, size=(12, 10))
    write_class_folder(data_dir / "mixed", {"dog": 2}, size=(10, 10))
    write_class_folder(data_dir / "not-an-image", {"cat": 1, "dog": 1})
    (data_dir / "not-an-image" / "dog" / "fake.png").write_text("not a PNG")

    msg = _spec_error({"name": "image-folder", "params": params})
    assert expected in msg, msg
    named = repr(params["path"].split("/")[-1])[1:-1]  # as the message quotes it
    assert named in msg or "test_path" in params, msg


def test_mixed_sizes_are_fine_when_resized(data_dir):
    write_class_folder(data_dir / "mixed", {"cat": 2}, size=(12, 10))
    write_class_folder(data_dir / "mixed", {"dog": 2}, size=(20, 16))
    SweepSpec.model_validate(
        tiny_spec(dataset={"name": "image-folder", "params": {"path": "mixed", "size": 12}})
    )
    assert load_dataset("image-folder", {"path": "mixed", "size": 12}).input_shape == (3, 12, 12)
    with pytest.raises(images.DataFormatError, match="'mixed' holds images of different sizes"):
        load_dataset("image-folder", {"path": "mixed"})  # a loader called directly refuses too


def test_the_disk_check_can_be_skipped_for_a_spec_read_back(data_dir):
    spec = tiny_spec(dataset={"name": "image-folder", "params": {"path": "gone"}})
    with pytest.raises(ValidationError, match="'gone'"):
        SweepSpec.model_validate(spec)
    checked = SweepSpec.model_validate(spec, context={"check_data": False})
    assert checked.dataset.params.path == "gone"


def test_cifar10_reads_the_python_batches(data_dir):
    write_cifar10(data_dir, per_batch=8)
    raw = _raw("cifar10")
    assert raw.x.shape == (40, 3, 32, 32) and raw.x_test.shape == (8, 3, 32, 32)
    assert raw.y[:8].tolist() == [i % 10 for i in range(8)] and raw.num_classes == 10
    rows = cifar_rows(8, 0)  # data_batch_1: planes red, green, blue, each row by row
    assert np.array_equal(raw.x[0, 0, 0], rows[0, :32])
    assert np.array_equal(raw.x[0, 1, 0], rows[0, 1024:1056])
    assert np.array_equal(raw.x[0, 2, 31], rows[0, 3072 - 32 :])
    assert _raw("cifar10", limit=12).x.shape[0] == 12
    d = load_dataset("cifar10", {})
    assert d.input_shape == (3, 32, 32) and d.num_classes == 10


def test_cifar100_fine_and_coarse_labels(data_dir):
    write_cifar100(data_dir, n_train=30, n_test=10)
    fine, coarse = _raw("cifar100"), _raw("cifar100", labels="coarse")
    assert fine.y[:4].tolist() == [0, 3, 6, 9] and fine.num_classes == 100
    assert coarse.y[:4].tolist() == [0, 1, 2, 3] and coarse.num_classes == 20
    assert load_dataset("cifar100", {"labels": "coarse"}).num_classes == 20


def test_cifar_missing_batches_are_spec_errors(data_dir):
    folder = write_cifar10(data_dir)
    (folder / "data_batch_3").unlink()
    msg = _spec_error({"name": "cifar10"})
    assert "cifar-10-batches-py" in msg and "lacks data_batch_3" in msg
    msg = _spec_error({"name": "cifar100", "params": {"path": "elsewhere/cifar"}})
    assert "'elsewhere/cifar'" in msg and "does not exist" in msg
    msg = _spec_error({"name": "cifar10", "params": {"path": "/tmp"}})
    assert "'/tmp' must be relative to the data directory" in msg


def test_cifar_batches_that_name_code_are_refused(data_dir, tmp_path):
    folder = write_cifar10(data_dir)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": Payload(), b"labels": []}, f)
    with pytest.raises(
        ValueError, match=r"test_batch is not a CIFAR batch file: it names .*system"
    ):
        _raw("cifar10")
    assert not marker.exists()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": cifar_rows(3, 0)[:, :100], b"labels": [0, 1, 2]}, f)
    with pytest.raises(ValueError, match="rows of 100 bytes, not 3072"):
        _raw("cifar10")


def test_idx_images_are_fitted_to_size_and_channels(data_dir):
    write_idx_folder(data_dir / "fashion")
    plain = _raw("fashion-mnist", path="fashion")
    padded = _raw("fashion-mnist", path="fashion", size=32, channels=3)
    assert plain.x.shape == (40, 1, 28, 28) and padded.x.shape == (40, 3, 32, 32)
    assert padded.x_test.shape == (10, 3, 32, 32)
    assert np.array_equal(padded.x[:, 0, 2:30, 2:30], plain.x[:, 0])  # centred
    assert padded.x[:, :, :2].max() == 0 and padded.x[:, :, :, 30:].max() == 0  # zero border
    assert np.array_equal(padded.x[:, 0], padded.x[:, 2])  # grey in every channel
    small = _raw("mnist", path="fashion", size=16, fit="resize")
    assert small.x.shape == (40, 1, 16, 16)
    assert load_dataset("fashion-mnist", {"path": "fashion", "size": 32}).input_shape == (1, 32, 32)
    msg = _spec_error({"name": "fashion-mnist", "params": {"size": 20}})
    assert "size 20 is below 28" in msg and "fit: resize" in msg
