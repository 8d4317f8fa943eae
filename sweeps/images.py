"""Images on disk: a folder of class sub-folders (PNG/JPEG) decoded once with Pillow and cached as
tensors, and fitting 28x28 grey images to the input a model wants (pad or resize, 1 or 3 channels).

The folder's layout is torchvision's ``ImageFolder``: ``<path>/<class>/**/<image>.png|jpg|jpeg``,
classes in sorted order. Everything is checked before any trial trains (:meth:`ImageFolderParams.
check_data` runs when the spec is validated): the path stays inside the data directory (``..`` and
symlinks that leave it are refused), every class has images, and without ``size`` all images have
one size. Decoded folders are cached under ``L0SWEEP_CACHE_DIR`` by a digest of the folder's
listing (names, sizes, modification times) and the decoding options: a changed folder is decoded
again, an unchanged one never twice, whichever process or trial comes first.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt

from .config import DataDirs, DataPathError, get_settings, resolve_data_path
from .domains import _Strict

__all__ = [
    "IMAGE_SUFFIXES",
    "DataFormatError",
    "FolderListing",
    "ImageFolderParams",
    "fit_images",
    "image_split",
    "load_image_folder",
    "scan_folder",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_CACHE_FORMAT = "image-folder-v1"  # change when the cached arrays change meaning


class DataFormatError(ValueError):
    """Dataset files that exist but cannot be used: no images, a class without images, images of
    different sizes, a file that is not what its name says."""


class ImageFolderParams(_Strict):
    path: str = Field(
        description="The folder, relative to the data directory: one sub-folder per class, PNG "
        "or JPEG images in each (sub-folders of a class included)."
    )
    test_path: str | None = Field(
        default=None,
        description="A folder of the same layout used as the test split (its classes: some or "
        "all of path's); None: the test split is drawn from path.",
    )
    size: PositiveInt | tuple[PositiveInt, PositiveInt] | None = Field(
        default=None,
        description="Resize every image to size x size (or [height, width]), bilinear; None: "
        "keep the images' own size, which must then be the same for all.",
    )
    channels: Literal[1, 3] = Field(default=3, description="1: grey; 3: RGB.")

    def hw(self) -> tuple[int, int] | None:
        """The (height, width) to resize to, or None."""
        if self.size is None:
            return None
        return (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)

    def check_data(self, dirs: DataDirs | None = None) -> None:
        """Check the folders as a spec is validated, so a bad one fails before any trial trains.

        Args:
            dirs: the data and cache directories; default: the settings read now.

        Raises:
            DataPathError: a path outside the data directory, missing, or not a folder.
            DataFormatError: no class folders, a class without images, mixed image sizes.
        """
        dirs = dirs or get_settings().data_dirs()
        train = scan_folder(self.path, dirs.data_dir)
        if len(train.classes) < 2:
            raise DataFormatError(
                f"image folder {self.path!r} has {len(train.classes)} class folder(s) "
                f"({', '.join(train.classes)}); a classifier needs at least two"
            )
        folders = [train]
        if self.test_path is not None:
            test = scan_folder(self.test_path, dirs.data_dir)
            _test_classes(train, test)
            folders.append(test)
        if self.size is None:
            sizes = {_common_size(f, dirs.cache_dir) for f in folders}
            if len(sizes) > 1:
                raise DataFormatError(
                    f"image folders {self.path!r} and {self.test_path!r} hold images of "
                    f"different sizes ({' and '.join(f'{w}x{h}' for w, h in sorted(sizes))}); "
                    "give params.size to resize them"
                )


@dataclass(frozen=True)
class FolderListing:
    """What a folder holds: its classes and images, and a digest of names, sizes and times."""

    label: str  # the path as the spec wrote it, for messages
    root: Path  # resolved
    classes: tuple[str, ...]
    files: tuple[str, ...]  # relative to root, class folder first
    labels: tuple[int, ...]  # index into classes, one per file
    digest: str


def scan_folder(relative: str, data_dir: Path | None = None) -> FolderListing:
    """List an image folder inside the data directory, checking its layout.

    Raises:
        DataPathError: the folder is outside the data directory (``..``, a symlink leaving it),
            missing or not a folder, or cannot be read.
        DataFormatError: it has no class sub-folders, or a class folder has no images.
    """
    data_root = Path(data_dir if data_dir is not None else get_settings().data_dir).resolve()
    root = resolve_data_path(relative, data_root)
    try:
        if not root.is_dir():
            what = "is not a folder" if root.exists() else "does not exist"
            raise DataPathError(f"image folder {relative!r} ({root}) {what}")
        classes = sorted(
            e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")
        )
        if not classes:
            raise DataFormatError(
                f"image folder {relative!r} ({root}) has no class sub-folders: put the images of "
                "each class in a sub-folder named after the class"
            )
        digest = hashlib.sha256()
        files: list[str] = []
        labels: list[int] = []
        for index, name in enumerate(classes):
            found = 0
            for path, stat in _images_under(root / name, data_root, relative, set()):
                rel = path.relative_to(root).as_posix()
                files.append(rel)
                labels.append(index)
                digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
                found += 1
            if found == 0:
                raise DataFormatError(
                    f"image folder {relative!r}: class folder {name!r} has no images "
                    f"({', '.join(IMAGE_SUFFIXES)})"
                )
    except OSError as err:  # unreadable, a name too long, a loop of symlinks, ...
        raise DataPathError(f"image folder {relative!r} cannot be read: {err}") from err
    return FolderListing(
        relative, root, tuple(classes), tuple(files), tuple(labels), digest.hexdigest()
    )


def _images_under(
    directory: Path, data_root: Path, label: str, seen: set[Path]
) -> Iterator[tuple[Path, os.stat_result]]:
    """The images below ``directory`` in sorted order, following symlinks that stay inside the
    data directory (and refusing those that leave it); each directory is visited once."""
    real = directory.resolve()
    if not real.is_relative_to(data_root):
        raise DataPathError(
            f"image folder {label!r}: {directory} is a link to {real}, outside the data "
            f"directory {data_root}"
        )
    if real in seen:
        return
    seen.add(real)
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        if entry.is_dir():
            yield from _images_under(path, data_root, label, seen)
        elif entry.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            if entry.is_symlink() and not path.resolve().is_relative_to(data_root):
                raise DataPathError(
                    f"image folder {label!r}: {path} is a link to {path.resolve()}, outside the "
                    f"data directory {data_root}"
                )
            yield path, entry.stat()


def _test_classes(train: FolderListing, test: FolderListing) -> None:
    unknown = sorted(set(test.classes) - set(train.classes))
    if unknown:
        raise DataFormatError(
            f"test folder {test.label!r} has classes that {train.label!r} lacks: {unknown}; "
            f"the classes are {list(train.classes)}"
        )


def _cache_path(listing: FolderListing, what: str, suffix: str, cache_dir: Path) -> Path:
    """Where something derived from the folder as listed now is cached."""
    key = f"{_CACHE_FORMAT}|{listing.root}|{listing.digest}|{what}"
    name = hashlib.sha256(key.encode()).hexdigest() + suffix
    return Path(cache_dir) / "image-folder" / name


@lru_cache(maxsize=16)
def _common_size(listing: FolderListing, cache_dir: Path) -> tuple[int, int]:
    """The (width, height) every image of the folder has, read from the headers only once per
    listing (recorded in the cache directory: every trial validates the spec again).

    Raises:
        DataFormatError: the images have different sizes, or a file is not an image.
    """
    from PIL import Image, UnidentifiedImageError

    record = _cache_path(listing, "size", ".txt", cache_dir)
    try:
        width, height = (int(v) for v in record.read_text().split())
        return width, height
    except (OSError, ValueError):
        pass  # not recorded yet (or unreadable): read the headers

    sizes: dict[tuple[int, int], list[str]] = {}
    for rel in listing.files:
        try:
            with Image.open(listing.root / rel) as im:
                sizes.setdefault(im.size, []).append(rel)
        except (UnidentifiedImageError, OSError) as err:
            raise DataFormatError(
                f"image folder {listing.label!r}: {rel!r} cannot be read as an image: {err}"
            ) from err
    if len(sizes) > 1:
        ranked = sorted(sizes.items(), key=lambda kv: -len(kv[1]))
        examples = "; ".join(f"{len(v)} of {w}x{h} such as {v[0]!r}" for (w, h), v in ranked[:3])
        raise DataFormatError(
            f"image folder {listing.label!r} holds images of different sizes ({examples}); "
            "give params.size to resize them"
        )
    width, height = next(iter(sizes))
    _write_atomically(record, f"{width} {height}\n".encode())
    return width, height


def load_image_folder(
    listing: FolderListing, hw: tuple[int, int], channels: int, cache_dir: Path
) -> np.ndarray:
    """The folder's images as uint8 (N, C, H, W), in the listing's order, decoded once.

    The decoded array is cached under the cache directory by a digest of the listing and the
    options; concurrent trials wait for the first to decode (a file lock) instead of decoding
    again. A cache that cannot be written is logged and skipped, never fatal.
    """
    cache = _cache_path(listing, f"{hw}|{channels}", ".npy", cache_dir)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        log.warning("cannot create the image cache %s (%s); decoding without it", cache.parent, err)
        return _decode_all(listing, hw, channels)
    with _locked(cache.with_suffix(".lock")):
        expected = (len(listing.files), channels, *hw)
        if cache.exists():
            try:
                x = np.load(cache, allow_pickle=False)
                if x.shape == expected and x.dtype == np.uint8:
                    return x
                log.warning(
                    "image cache %s has shape %s, not %s; decoding", cache, x.shape, expected
                )
            except (OSError, ValueError) as err:
                log.warning("image cache %s cannot be read (%s); decoding again", cache, err)
        x = _decode_all(listing, hw, channels)
        buffer = io.BytesIO()
        np.save(buffer, x, allow_pickle=False)
        _write_atomically(cache, buffer.getvalue())
        return x


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (POSIX ``flock``; no lock where there is none)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: two trials may both decode, and both write the same cache
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write a cache file whole or not at all; a cache that cannot be written is only logged."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)  # readers see the whole file or none
    except OSError as err:
        log.warning("cannot write the image cache %s: %s", path, err)
        tmp.unlink(missing_ok=True)


def _decode_all(listing: FolderListing, hw: tuple[int, int], channels: int) -> np.ndarray:
    """Decode every image with Pillow (threads: its decoders release the GIL)."""
    x = np.empty((len(listing.files), channels, *hw), dtype=np.uint8)

    def decode(i: int) -> None:
        x[i] = _decode(listing, listing.files[i], hw, channels)

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(decode, range(len(listing.files))))
    log.info("decoded %d images of %s at %s", len(x), listing.label, hw)
    return x


def _decode(listing: FolderListing, rel: str, hw: tuple[int, int], channels: int) -> np.ndarray:
    """One image as uint8 (C, H, W)."""
    from PIL import Image, UnidentifiedImageError

    mode = "RGB" if channels == 3 else "L"
    height, width = hw
    try:
        with Image.open(listing.root / rel) as im:
            im.draft(mode, (width, height))  # JPEG: decode at a reduced scale when it is larger
            im = im.convert(mode)
            if im.size != (width, height):
                im = im.resize((width, height), Image.Resampling.BILINEAR)
            pixels = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise DataFormatError(
            f"image folder {listing.label!r}: {rel!r} cannot be decoded: {err}"
        ) from err
    return pixels.reshape(height, width, channels).transpose(2, 0, 1)


def fit_images(
    x: np.ndarray, size: int | None, fit: Literal["pad", "resize"], channels: int
) -> np.ndarray:
    """Fit images (N, C, H, W) to ``size`` x ``size`` and ``channels``.

    ``pad`` centres each image in zeros (the classic way to give 28x28 digits to a 32x32
    network); ``resize`` interpolates bilinearly (antialiased when shrinking). Grey images get
    three channels by repeating the one.

    Raises:
        ValueError: padding cannot reach ``size``, or the channels cannot be converted.
    """
    n, c, h, w = x.shape
    if size is not None and (h, w) != (size, size):
        if fit == "pad":
            if size < h or size < w:
                raise ValueError(f"cannot pad {h}x{w} images to {size}x{size}; use fit: resize")
            top, left = (size - h) // 2, (size - w) // 2
            x = np.pad(x, ((0, 0), (0, 0), (top, size - h - top), (left, size - w - left)))
        else:
            out = np.empty((n, c, size, size), dtype=np.float32)
            for i in range(0, n, 4096):  # in chunks: the float copy of a whole split is large
                chunk = torch.tensor(x[i : i + 4096], dtype=torch.float32)  # x may be read-only
                out[i : i + 4096] = F.interpolate(
                    chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False
                ).numpy()
            x = out
    if channels != c:
        if c != 1:
            raise ValueError(f"cannot make {channels}-channel images of {c}-channel ones")
        x = np.repeat(x, channels, axis=1)
    return x


def image_split(
    params: ImageFolderParams, dirs: DataDirs | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, dict]:
    """``(x, y, x_test, y_test, info)`` of an image-folder dataset (uint8 images) in ``dirs``
    (default: the settings read now)."""
    dirs = dirs or get_settings().data_dirs()
    params.check_data(dirs)  # as the spec did: a loader called directly refuses the same folders
    train = scan_folder(params.path, dirs.data_dir)
    hw = params.hw()
    if hw is None:
        width, height = _common_size(train, dirs.cache_dir)
        hw = (height, width)
    x = load_image_folder(train, hw, params.channels, dirs.cache_dir)
    y = np.asarray(train.labels, dtype=np.int64)
    info = {"dir": str(train.root), "classes": list(train.classes)}
    if params.test_path is None:
        return x, y, None, None, info
    test = scan_folder(params.test_path, dirs.data_dir)
    _test_classes(train, test)
    index = {name: i for i, name in enumerate(train.classes)}
    y_test = np.asarray([index[test.classes[j]] for j in test.labels], dtype=np.int64)
    return x, y, load_image_folder(test, hw, params.channels, dirs.cache_dir), y_test, info
