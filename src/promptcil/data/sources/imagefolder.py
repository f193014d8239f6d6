"""Your own images: an ImageFolder tree `root/{train,test}/<class>/<image>`."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from promptcil.config.base import Section
from promptcil.data.sources.base import (
    DataError,
    ImageSet,
    Split,
    class_image_files,
    read_rgb_image,
    register_file_list,
    register_source,
)


class ImageFolderFields(Section):
    image_size: int | None = Field(
        None, gt=0, description="imagefolder only: images are resized to this square size on load "
        "(defaults to backbone.img_size)."
    )


@register_source("imagefolder", fields=ImageFolderFields)
def imagefolder(cfg: Any, split: Split, image_size: int) -> ImageSet:
    """An ImageFolder tree `root/{train,test}/<class>/<image>`, decoded once into memory.

    Images of any size and mode become RGB squares of `data.image_size` (or the
    backbone's size) so they stack into one uint8 tensor. Labels follow the sorted
    class folder names, which must be the same in train/ and test/.
    """
    files = imagefolder_files(cfg, split)
    paths = [path for images in files.values() for path in images]
    labels = [label for label, images in enumerate(files.values()) for _ in images]
    size = cfg.image_size or image_size
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # Pillow decodes without the GIL
        arrays = list(pool.map(lambda path: read_rgb_image(path, size), paths))
    return ImageSet(
        images=torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(),
        labels=torch.tensor(labels, dtype=torch.int64),
        class_names=list(files),
    )


@register_file_list("imagefolder")
def imagefolder_files(cfg: Any, split: Split) -> dict[str, list[Path]]:
    """The image files of `split` by class folder (sorted), after checking the tree."""
    if cfg.root is None:
        raise DataError("data.root: required for source imagefolder (a folder with train/ and test/)")
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(f"data.root: {root} does not exist")
    for part in ("train", "test"):
        if not (root / part).is_dir():
            raise DataError(f"data.root: {root} has no {part}/ folder (expected {root}/{part}/<class>/<image>)")
    train_classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir() and not p.name.startswith("."))
    test_classes = sorted(p.name for p in (root / "test").iterdir() if p.is_dir() and not p.name.startswith("."))
    if train_classes != test_classes:
        missing = sorted(set(train_classes) - set(test_classes))
        extra = sorted(set(test_classes) - set(train_classes))
        raise DataError(
            f"data.root: test/ classes differ from train/ classes in {root} (missing in test: {missing}, "
            f"only in test: {extra})"
        )
    return class_image_files(root / split)
