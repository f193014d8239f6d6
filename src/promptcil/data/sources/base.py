"""What every image source shares: the ImageSet, the registry, decoding a file, the one-line DataError.

A source is one module of this package: a function registered with `register_source(name, fields)`,
where `fields` are the settings it adds to params' `data` section. Heavy libraries (torchvision,
scikit-learn) are imported by the source that needs them.

Images stay uint8 in host memory (4x smaller than float32) and are converted and
normalised only on the device (see `DevicePreprocess`). Every source returns the
ORIGINAL class ids of the dataset; the class-incremental order is applied later
by `TaskSplit.relabel`, so one cached `ImageSet` serves any class order.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from pydantic import BaseModel

from promptcil.errors import DataError
from promptcil.registry import Registry

Split = Literal["train", "test"]
SourceFn = Callable[[Any, Split, int], "ImageSet"]

DEFAULT_ROOT = Path("data/raw")
"""torchvision root when `data.root` is null, inside the workspace (the stages resolve it there)."""

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's `dataset-fashion-mnist` package installs the four original `*-ubyte.gz` files."""


@dataclass
class ImageSet:
    """Images and their labels, kept uint8 until they reach the device."""

    images: torch.Tensor
    """(N, C, H, W) uint8, C in {1, 3}, every image the same size."""
    labels: torch.Tensor
    """(N,) int64."""
    class_names: list[str]
    """Name of each label, indexed by label."""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] not in (1, 3):
            raise DataError(
                f"images must be (N, 1|3, H, W) uint8, got {tuple(self.images.shape)} {self.images.dtype}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise DataError(
                f"labels must be ({self.images.shape[0]},) int64, got {tuple(self.labels.shape)} {self.labels.dtype}"
            )

    def __len__(self) -> int:
        return self.labels.shape[0]

    def take(self, rows: torch.Tensor | slice) -> ImageSet:
        """The images at `rows` (indices, a mask or a slice)."""
        return ImageSet(self.images[rows], self.labels[rows], self.class_names)

    def first(self, n: int) -> torch.Tensor:
        """The first `n` images, uint8 (examples, FLOP counts)."""
        return self.images[:n]


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


SOURCES: Registry[SourceFn] = Registry("data source", "promptcil.data.sources")
"""Data sources by name (the value of `data.source`)."""


def register_source(name: str, fields: type[BaseModel] | None = None) -> Callable[[SourceFn], SourceFn]:
    """Add a source to `SOURCES`; `fields`: the settings it adds to `data` (flat: data.<field>)."""
    return SOURCES.register(name, fields)


FileListFn = Callable[[Any, Split], dict[str, list[Path]]]

FILE_LISTS: Registry[FileListFn] = Registry("sharded data source", "promptcil.data.sources")
"""Sources that can be sharded (data.shards): a function giving a split's image files by class name (sorted:
a class's original id is its position), registered under the source's name."""


def register_file_list(name: str) -> Callable[[FileListFn], FileListFn]:
    """Let source `name` opt in to `data.shards`: prepare packs the files this function lists."""
    return FILE_LISTS.register(name)


def list_files(cfg: Any, split: Split) -> dict[str, list[Path]]:
    if cfg.source not in FILE_LISTS:
        raise DataError(f"data.shards: source '{cfg.source}' cannot be sharded (sources that can: "
                        f"{', '.join(sorted(FILE_LISTS.names()))}); set data.shards: false")
    return FILE_LISTS[cfg.source].obj(cfg, split)


def load_split(cfg: Any, split: Split, image_size: int) -> ImageSet:
    """Load one split of `cfg.source` with its original class ids.

    `image_size` is the backbone's input size; only imagefolder uses it (unless
    `data.image_size` is set), the fixed-size sources are resized on the device.
    """
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got '{split}'")
    if cfg.source not in SOURCES:
        raise DataError(f"data.source: unknown source '{cfg.source}' (known: {', '.join(sorted(SOURCES.names()))})")
    return SOURCES[cfg.source].obj(cfg, split, image_size)


def torchvision_root(cfg: Any) -> Path:
    return cfg.root if cfg.root is not None else DEFAULT_ROOT


def decompress_atomically(src: Path, dst: Path) -> None:
    """Write `dst` via a temp file so an interrupted copy never leaves a half file that looks complete."""
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, gzip.open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, length=1 << 20)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}


def read_rgb_image(path: Path, size: int | None) -> np.ndarray:
    """Decode one file into (size, size, 3) uint8 (size None: its own size).

    Conversions: 16-bit greyscale (Pillow modes I;16*, and I as older Pillow opens
    16-bit PNGs) is scaled by 255/65535, not clipped, so its contrast survives;
    palette images go through RGBA so their transparency is honoured by Pillow; the
    alpha channel is then dropped. Greyscale, CMYK, YCbCr and the rest use Pillow's
    RGB conversion. EXIF orientation is applied, then the image is stretched to a
    square with bilinear filtering (antialiased by Pillow when shrinking).
    """
    try:
        with Image.open(path) as img:
            img.load()  # decode now: Image.open only reads the header, truncation shows up here
            img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"data.root: cannot read image {path}: {one_line(err)}") from err
    if img.mode in _SIXTEEN_BIT_MODES:
        grey = np.rint(np.asarray(img, dtype=np.float64) * (255.0 / 65535.0)).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(grey).convert("RGB")
    elif img.mode == "P":
        img = img.convert("RGBA").convert("RGB")
    else:
        img = img.convert("RGB")
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img)


def class_image_files(split_dir: Path) -> dict[str, list[Path]]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    folders = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"data.root: {split_dir} has no class folders")
    files: dict[str, list[Path]] = {}
    for folder in folders:
        images = sorted(
            p for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMG_EXTENSIONS
        )
        if not images:
            raise DataError(f"data.root: class folder {folder} has no images ({', '.join(IMG_EXTENSIONS)})")
        files[folder.name] = images
    return files


