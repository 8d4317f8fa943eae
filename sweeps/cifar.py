"""CIFAR-10 and CIFAR-100 from the standard python-pickle batch directories (Krizhevsky 2009).

``cifar-10-batches-py/`` holds ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``;
``cifar-100-python/`` holds ``train`` and ``test``. Each file is a pickled dict (written by
Python 2, hence bytes keys) with ``b"data"``, uint8 (N, 3072): the red, green and blue 32x32
planes row by row, and ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` and ``b"coarse_labels"``
(CIFAR-100).

A pickle can name any Python callable, and a spec must never make l0sweep run code (a lab's data
directory is shared, and anyone may drop a file in it): the batches are read by an unpickler that
builds only numpy arrays, lists, dicts, strings and numbers, and refuses anything else.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, PositiveInt

from .config import DataDirs, DataPathError, get_settings, resolve_data_path
from .domains import _Strict
from .images import DataFormatError

__all__ = ["CIFAR_LAYOUTS", "Cifar10Params", "Cifar100Params", "cifar_split", "read_batch"]

# dataset name -> (default folder, training files, test file)
CIFAR_LAYOUTS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch"),
    "cifar100": ("cifar-100-python", ("train",), "test"),
}

# What numpy's own pickles of arrays name (numpy 1 and 2 spellings), and the codec Python 3 uses
# for bytes in protocol 2. Nothing here runs code of a file's choosing.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(
                f"it names {module}.{name}, which a CIFAR batch does not (only numpy arrays, "
                "lists and numbers are read)"
            )
        return super().find_class(module, name)


def read_batch(path: Path) -> dict[bytes, Any]:
    """One batch file as its dict, built by the restricted unpickler.

    Raises:
        DataFormatError: the file is not a pickled dict of arrays and lists.
    """
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise DataFormatError(f"{path} is not a CIFAR batch file: {err}") from err
    except OSError as err:
        raise DataPathError(f"{path} cannot be read: {err}") from err
    if not isinstance(batch, dict):
        raise DataFormatError(
            f"{path} is not a CIFAR batch file: it holds a {type(batch).__name__}"
        )
    return batch


class Cifar10Params(_Strict):
    path: str | None = Field(
        default=None,
        description="The batch folder, relative to the data directory; default: "
        "cifar-10-batches-py (cifar-100-python for cifar100).",
    )
    limit: PositiveInt | None = Field(default=None, description="Use the first N training images.")

    dataset: ClassVar[str] = "cifar10"  # which layout of CIFAR_LAYOUTS

    def folder(self, data_dir: Path | None = None) -> tuple[str, Path]:
        """The folder as written (or the default) and resolved inside the data directory
        (default: the settings read now)."""
        relative = self.path or CIFAR_LAYOUTS[self.dataset][0]
        return relative, resolve_data_path(relative, data_dir)

    def check_data(self, dirs: DataDirs | None = None) -> None:
        """Check that the folder is inside the data directory and holds every batch file.

        Args:
            dirs: the data directories; default: the settings read now.

        Raises:
            DataPathError: the folder is outside the data directory, or a batch file is missing.
        """
        relative, root = self.folder(dirs.data_dir if dirs else None)
        _, train_files, test_file = CIFAR_LAYOUTS[self.dataset]
        try:
            if not root.is_dir():
                what = "is not a folder" if root.exists() else "does not exist"
                raise DataPathError(f"{self.dataset} folder {relative!r} ({root}) {what}")
            missing = [n for n in (*train_files, test_file) if not (root / n).is_file()]
        except OSError as err:
            raise DataPathError(
                f"{self.dataset} folder {relative!r} cannot be read: {err}"
            ) from err
        if missing:
            raise DataPathError(
                f"{self.dataset} folder {relative!r} ({root}) lacks {', '.join(missing)}; the "
                f"python version of {self.dataset} has {', '.join((*train_files, test_file))}"
            )


class Cifar100Params(Cifar10Params):
    labels: Literal["fine", "coarse"] = Field(
        default="fine", description="fine: the 100 classes; coarse: the 20 superclasses."
    )

    dataset: ClassVar[str] = "cifar100"


def _images_and_labels(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    batch = read_batch(path)
    data, labels = batch.get(b"data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataFormatError(f"{path}: b'data' must be a uint8 array (N, 3072)")
    if data.shape[1] != 3 * 32 * 32:
        raise DataFormatError(f"{path}: b'data' has rows of {data.shape[1]} bytes, not 3072")
    if labels is None or len(labels) != len(data):
        got = "none" if labels is None else len(labels)
        raise DataFormatError(f"{path}: {label_key!r} must hold {len(data)} labels, got {got}")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def cifar_split(
    params: Cifar10Params, dirs: DataDirs | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """``(x, y, x_test, y_test, info)``: uint8 images (N, 3, 32, 32) and int64 labels, from
    ``dirs`` (default: the settings read now)."""
    dirs = dirs or get_settings().data_dirs()
    params.check_data(dirs)
    _, root = params.folder(dirs.data_dir)
    _, train_files, test_file = CIFAR_LAYOUTS[params.dataset]
    key = b"labels" if params.dataset == "cifar10" else f"{params.labels}_labels".encode()
    parts = [_images_and_labels(root / name, key) for name in train_files]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    if params.limit is not None:
        x, y = x[: params.limit], y[: params.limit]
    x_test, y_test = _images_and_labels(root / test_file, key)
    return x, y, x_test, y_test, {"dir": str(root)}
