"""CIFAR-100 (fine labels) through torchvision."""

from __future__ import annotations

from typing import Any

import torch

from promptcil.data.sources.base import DataError, ImageSet, Split, one_line, register_source, torchvision_root


@register_source("cifar100")
def cifar100(cfg: Any, split: Split, image_size: int) -> ImageSet:
    """CIFAR-100 (fine labels) through torchvision, which checks the files' md5."""
    from torchvision.datasets import CIFAR100

    root = torchvision_root(cfg)
    try:
        dataset = CIFAR100(root, train=split == "train", download=cfg.download)
    except (RuntimeError, OSError) as err:
        hint = "check the files" if cfg.download else "put cifar-100-python/ there or set data.download: true"
        raise DataError(f"data.root: CIFAR-100 not usable in {root} ({one_line(err)}); {hint}") from err
    return ImageSet(
        images=torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous(),
        labels=torch.tensor(dataset.targets, dtype=torch.int64),
        class_names=list(dataset.classes),
    )
