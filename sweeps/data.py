"""Built-in datasets, all real and offline: IDX files (Fashion-MNIST, MNIST), CIFAR-10/100 batch
folders, a folder of images per class, scikit-learn's digits, MNIST-1D, a sparse teacher, and a
user's npz file.

A loader returns raw numpy arrays (and a test split where the dataset has an official one);
:func:`load_dataset` splits off validation (and test where needed) with the spec's seed,
standardises with training statistics only (per channel for images), and caches the result per
process. Images stay uint8 until then: standardising makes the 0-255 scale irrelevant.

A loader that reads files takes ``dirs`` (:class:`sweeps.config.DataDirs`, the data directories
of the process, passed in by :func:`load_dataset`; default: the settings read now). A dataset's
params may define ``check_data()``, which the spec calls as it validates (a missing
file, an empty folder, a path leaving the data directory: a spec error, a 422 from the service,
before any trial trains). The image datasets live in :mod:`sweeps.images` and :mod:`sweeps.cifar`.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from .cifar import Cifar10Params, Cifar100Params, cifar_split
from .config import DataDirs, get_settings, resolve_data_path
from .images import ImageFolderParams, fit_images, image_split
from .registry import DATASETS, register_dataset, takes_dirs

__all__ = ["DataSplits", "RawData", "load_dataset", "read_idx"]


@dataclass
class RawData:
    """Arrays as a loader returns them; ``x_test`` is None when there is no official test split.
    ``num_classes``: the dataset's own count, where a split may lack the last classes."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None


@dataclass
class DataSplits:
    """Standardised float32 inputs and int64 labels for the three splits."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    input_shape: tuple[int, ...]
    num_classes: int
    info: dict[str, Any] = field(default_factory=dict)


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gives_images: ClassVar[bool | None] = None
    """False: the dataset gives signals, not images (C, H, W), so ``augment`` is refused at
    validation; None: known once the data load (the driver's check before any trial)."""


class IdxParams(_Params):
    path: str | None = Field(
        default=None,
        description="Directory of the IDX files, relative to the data directory; "
        "default: the dataset's directory setting.",
    )
    limit: PositiveInt | None = Field(default=None, description="Use the first N training images.")
    size: int | None = Field(
        default=None,
        ge=8,
        le=512,
        description="Make the 28x28 images size x size (32 for CIFAR-style networks); None: 28.",
    )
    fit: Literal["pad", "resize"] = Field(
        default="pad",
        description="pad: centre the image in zeros (size >= 28); resize: bilinear.",
    )
    channels: Literal[1, 3] = Field(
        default=1, description="3: repeat the grey channel, for networks that expect RGB."
    )

    @model_validator(mode="after")
    def _reachable_size(self) -> IdxParams:
        if self.fit == "pad" and self.size is not None and self.size < 28:
            raise ValueError(
                f"size {self.size} is below 28, which padding cannot reach; use fit: resize"
            )
        return self


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not) as a numpy array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(directory: Path, stem: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{stem}(.gz) not found in {directory}")


def _load_idx_dir(directory: Path, params: IdxParams) -> RawData:
    x = read_idx(_find_idx(directory, "train-images-idx3-ubyte"))
    y = read_idx(_find_idx(directory, "train-labels-idx1-ubyte"))
    x_test = read_idx(_find_idx(directory, "t10k-images-idx3-ubyte"))
    y_test = read_idx(_find_idx(directory, "t10k-labels-idx1-ubyte"))
    if params.limit is not None:
        x, y = x[: params.limit], y[: params.limit]
    x, x_test = (
        fit_images(a[:, None], params.size, params.fit, params.channels) for a in (x, x_test)
    )
    return RawData(x, y, x_test, y_test, {"dir": str(directory)}, num_classes=10)


@register_dataset("fashion-mnist", params=IdxParams)
def fashion_mnist(params: IdxParams, dirs: DataDirs | None = None) -> RawData:
    """Fashion-MNIST (28x28 grey clothing images, 10 classes) from IDX files."""
    dirs = dirs or get_settings().data_dirs()
    directory = (
        resolve_data_path(params.path, dirs.data_dir) if params.path else dirs.fashion_mnist_dir
    )
    return _load_idx_dir(directory, params)


@register_dataset("mnist", params=IdxParams)
def mnist(params: IdxParams, dirs: DataDirs | None = None) -> RawData:
    """MNIST (28x28 grey digits, 10 classes) from IDX files."""
    dirs = dirs or get_settings().data_dirs()
    directory = resolve_data_path(params.path, dirs.data_dir) if params.path else dirs.mnist_dir
    return _load_idx_dir(directory, params)


@register_dataset("digits")
def digits(params: BaseModel) -> RawData:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes); quick tests and demos.

    Read from the file scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``, what
    ``load_digits`` reads): importing ``sklearn.datasets`` costs a second of CPU, paid by every
    trial and driver that loads the data, for 20 ms of parsing.
    """
    data = np.loadtxt(_sklearn_data_file("digits.csv.gz"), delimiter=",")
    return RawData(data[:, :-1].reshape(-1, 1, 8, 8) / 16.0, data[:, -1].astype(np.int64))


def _sklearn_data_file(name: str) -> Path:
    """A data file bundled with scikit-learn, found without importing it."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"dataset file {name!r}: scikit-learn is not installed (pip install scikit-learn)"
        )
    path = Path(spec.origin).parent / "datasets" / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {name!r}: not in scikit-learn's data ({path})")
    return path


@register_dataset("image-folder", params=ImageFolderParams)
def image_folder(params: ImageFolderParams, dirs: DataDirs | None = None) -> RawData:
    """Images on disk, one sub-folder per class (PNG/JPEG), decoded once and cached as tensors."""
    x, y, x_test, y_test, info = image_split(params, dirs)
    return RawData(x, y, x_test, y_test, info, num_classes=len(info["classes"]))


@register_dataset("cifar10", params=Cifar10Params)
def cifar10(params: Cifar10Params, dirs: DataDirs | None = None) -> RawData:
    """CIFAR-10 (32x32 colour images, 10 classes) from the python batch folder on disk."""
    return RawData(*cifar_split(params, dirs), num_classes=10)


@register_dataset("cifar100", params=Cifar100Params)
def cifar100(params: Cifar100Params, dirs: DataDirs | None = None) -> RawData:
    """CIFAR-100 (32x32 colour images, 100 fine or 20 coarse classes) from the python folder."""
    return RawData(*cifar_split(params, dirs), num_classes=100 if params.labels == "fine" else 20)


class Mnist1dParams(_Params):
    gives_images: ClassVar[bool | None] = False
    num_samples: PositiveInt = 5000
    seed: int = 42


@register_dataset("mnist1d", params=Mnist1dParams)
def mnist1d(params: Mnist1dParams) -> RawData:
    """MNIST-1D (Greydanus 2020): 40-sample 1D signals, 10 classes, generated locally."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = params.num_samples, params.seed
    d = make_dataset(args)
    return RawData(d["x"], d["y"], d["x_test"], d["y_test"])


class SparseTeacherParams(_Params):
    gives_images: ClassVar[bool | None] = False
    num_samples: PositiveInt = 6000
    num_features: PositiveInt = 64
    hidden: PositiveInt = 32
    num_classes: int = Field(default=4, ge=2)
    density: float = Field(default=0.1, gt=0, le=1, description="Fraction of nonzero weights.")
    seed: int = 0


@register_dataset("sparse-teacher", params=SparseTeacherParams)
def sparse_teacher(params: SparseTeacherParams) -> RawData:
    """Labels from a random two-layer teacher with a known fraction of nonzero weights."""
    rng = np.random.default_rng(params.seed)
    shapes = [(params.num_features, params.hidden), (params.hidden, params.num_classes)]
    weights = [rng.normal(size=s) * (rng.random(s) < params.density) for s in shapes]
    x = rng.normal(size=(params.num_samples, params.num_features))
    y = np.argmax(np.maximum(x @ weights[0], 0) @ weights[1], axis=1)
    nonzero = sum(int((w != 0).sum()) for w in weights)
    total = sum(w.size for w in weights)
    return RawData(x, y, info={"teacher_density": nonzero / total})


class NpzParams(_Params):
    path: str = Field(description="The .npz file, relative to the data directory.")
    x_key: str = "x"
    y_key: str = "y"
    x_test_key: str | None = Field(default=None, description="Official test inputs, if any.")
    y_test_key: str | None = None


@register_dataset("npz", params=NpzParams)
def npz(params: NpzParams, dirs: DataDirs | None = None) -> RawData:
    """A user's .npz file with input and integer label arrays (no pickled objects)."""
    path = resolve_data_path(params.path, dirs.data_dir if dirs else None)
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in (params.x_key, params.y_key) if k not in f.files]
        if missing:
            raise KeyError(f"{params.path} lacks arrays {missing}; it has {f.files}")
        raw = RawData(f[params.x_key], f[params.y_key])
        if params.x_test_key and params.y_test_key:
            raw.x_test, raw.y_test = f[params.x_test_key], f[params.y_test_key]
    return raw


def _take(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Float32 copy of some examples: the loader's uint8 images are converted split by split."""
    return np.asarray(x[idx], dtype=np.float32)


def _standardise(train: np.ndarray, *others: np.ndarray) -> None:
    """Standardise in place with the training split's mean and deviation: one per channel for
    images of several channels (N, C, H, W), one for everything else."""
    axes = (0, 2, 3) if train.ndim == 4 and train.shape[1] > 1 else None
    mean = train.mean(axis=axes, keepdims=axes is not None)
    std = train.std(axis=axes, keepdims=axes is not None)
    std = np.where(std > 0, std, 1.0).astype(np.float32) if axes else (float(std) or 1.0)
    for x in (train, *others):
        x -= mean
        x /= std


@lru_cache(maxsize=4)
def _load_cached(
    name: str,
    params_json: str,
    val_fraction: float,
    test_fraction: float,
    split_seed: int,
    dirs: DataDirs,
) -> DataSplits:
    entry = DATASETS.get(name)
    params = entry.params.model_validate(json.loads(params_json))
    raw: RawData = entry.factory(params, **takes_dirs(entry.factory, dirs))
    y = np.asarray(raw.y).astype(np.int64)
    rng = np.random.default_rng(split_seed)
    order = rng.permutation(len(raw.x))
    if raw.x_test is None:
        n_test = max(1, round(test_fraction * len(order)))
        test_idx, order = order[:n_test], order[n_test:]
        x_test, y_test = _take(raw.x, test_idx), y[test_idx]
    else:
        x_test = np.array(raw.x_test, dtype=np.float32)  # a copy: standardised in place
        y_test = np.asarray(raw.y_test).astype(np.int64)
    n_val = max(1, round(val_fraction * len(order)))
    val_idx, train_idx = order[:n_val], order[n_val:]
    x_train, x_val = _take(raw.x, train_idx), _take(raw.x, val_idx)
    _standardise(x_train, x_val, x_test)
    num_classes = max(int(max(y.max(), y_test.max())) + 1, raw.num_classes or 0)
    return DataSplits(
        train=(torch.from_numpy(x_train), torch.from_numpy(y[train_idx])),
        val=(torch.from_numpy(x_val), torch.from_numpy(y[val_idx])),
        test=(torch.from_numpy(x_test), torch.from_numpy(y_test)),
        input_shape=tuple(x_train.shape[1:]),
        num_classes=num_classes,
        info={**raw.info, "n_train": len(train_idx), "n_val": len(val_idx), "n_test": len(x_test)},
    )


def load_dataset(
    name: str,
    params: dict[str, Any] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    dirs: DataDirs | None = None,
) -> DataSplits:
    """Load a registered dataset and split it; the same arguments give the same splits.

    Loaded once per process for the same arguments, the data directories included.

    Args:
        name: a registered dataset name.
        params: the dataset's parameters (validated by its params model).
        val_fraction: fraction of the training data held out for validation.
        test_fraction: fraction held out for test where the dataset has no official test split.
        split_seed: seed of the split permutation.
        dirs: where the files are (`sweeps.config.SweepSettings.data_dirs`); default: the
            settings read now.
    """
    params_json = json.dumps(params or {}, sort_keys=True)
    dirs = dirs or get_settings().data_dirs()
    return _load_cached(name, params_json, val_fraction, test_fraction, split_seed, dirs)
