"""New classes arriving for the scheduled retrain: `incoming/<class name>/<images>`.

A folder whose class the current model already knows is skipped (logged, not
an error): it was learned by an earlier retrain, which is what makes running
the retrain twice on the same folder a no-op.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from promptcil.data import DataError, ImageSet
from promptcil.data.sources import class_image_files, read_rgb_image


@dataclass
class IncomingClasses:
    train: ImageSet  # labels 0..n-1 in `names` order
    test: ImageSet
    names: list[str]
    # of every new class's file names and bytes: a retrain's work folder is resumed only for the same images
    sha256: str


def read_incoming(
    folder: Path, known: list[str], like: ImageSet, test_fraction: float = 0.25, seed: int = 0
) -> tuple[IncomingClasses | None, list[str]]:
    """The unknown classes in `folder`, decoded to `like`'s size and channel count and split into
    train/test per class (seeded), and the names skipped as already known. None when nothing is new."""
    folder = Path(folder)
    if not folder.is_dir() or not any(p.is_dir() for p in folder.iterdir()):
        return None, []
    files = class_image_files(folder)
    skipped = sorted(name for name in files if name in known)
    new = [name for name in files if name not in known]
    if not new:
        return None, skipped
    height, width = like.images.shape[-2:]
    if height != width:
        raise DataError(f"incoming: existing images are {height}x{width}; only square images are supported")
    rng = np.random.RandomState(seed)
    parts: dict[str, list[tuple[np.ndarray, int]]] = {"train": [], "test": []}
    digest = hashlib.sha256()
    for label, name in enumerate(new):
        paths = files[name]
        for path in paths:
            digest.update(f"{name}/{path.name}\0".encode())
            digest.update(path.read_bytes())
        if len(paths) < 2:
            raise DataError(f"incoming: class folder {folder / name} needs at least 2 images (train and test)")
        order = rng.permutation(len(paths))
        n_test = max(1, int(round(len(paths) * test_fraction)))
        for rank, index in enumerate(order):
            image = read_rgb_image(paths[index], height)
            if like.images.shape[1] == 1:  # the model's data is grey: keep it so (ITU-R 601 luma)
                image = (image @ np.array([0.299, 0.587, 0.114])).round().clip(0, 255).astype(np.uint8)[..., None]
            parts["test" if rank < n_test else "train"].append((image, label))
    sets = {
        split: ImageSet(
            images=torch.from_numpy(np.stack([a for a, _ in items])).permute(0, 3, 1, 2).contiguous(),
            labels=torch.tensor([y for _, y in items], dtype=torch.int64),
            class_names=list(new),
        )
        for split, items in parts.items()
    }
    return IncomingClasses(sets["train"], sets["test"], new, digest.hexdigest()), skipped
