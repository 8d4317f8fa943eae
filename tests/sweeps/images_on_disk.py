"""Writers of image datasets in their real on-disk formats, for the tests: class folders of PNG and
JPEG files (Pillow), CIFAR python batch folders (pickled dicts), IDX files."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

# One colour per class: a network separates them in a few steps.
COLOURS = {"cat": (220, 40, 40), "dog": (40, 40, 220), "fox": (40, 200, 40)}


def write_class_folder(
    root: Path,
    counts: dict[str, int],
    size: tuple[int, int] = (12, 10),
    fmt: str = "PNG",
    seed: int = 0,
) -> list[Path]:
    """``root/<class>/<i>.png|jpg``: noisy images of the class's colour, ``size`` = (W, H)."""
    rng = np.random.default_rng(seed)
    written = []
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            base = np.array(COLOURS[name], dtype=np.int16)
            noise = rng.integers(-30, 30, size=(size[1], size[0], 3))
            pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
            path = root / name / f"{i:03d}.{'png' if fmt == 'PNG' else 'jpg'}"
            Image.fromarray(pixels).save(path, format=fmt)
            written.append(path)
    return written


def cifar_rows(n: int, seed: int) -> np.ndarray:
    """``n`` CIFAR rows (uint8, 3072): red plane, green plane, blue plane, each 32x32 row-major."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_cifar10(root: Path, per_batch: int = 8, protocol: int = 2) -> Path:
    """``root/cifar-10-batches-py`` with data_batch_1..5 and test_batch, as CIFAR's python files."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        labels = [(k + i) % 10 for i in range(per_batch)]
        batch = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": cifar_rows(per_batch, k),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
    return folder


def write_cifar100(root: Path, n_train: int = 30, n_test: int = 10) -> Path:
    """``root/cifar-100-python`` with train and test (fine and coarse labels)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for k, (name, n) in enumerate((("train", n_train), ("test", n_test))):
        batch = {
            b"data": cifar_rows(n, 10 + k),
            b"fine_labels": [(3 * i) % 100 for i in range(n)],
            b"coarse_labels": [i % 20 for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return folder


def write_idx(path: Path, array: np.ndarray) -> None:
    """An unsigned-byte IDX file (gzipped), as MNIST and Fashion-MNIST ship."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_idx_folder(folder: Path, n_train: int = 40, n_test: int = 10) -> Path:
    """Fashion-MNIST's four IDX files with 28x28 images of random bytes."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(1, 256, (n, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return folder
