"""Fashion-MNIST through torchvision, offline from Debian's `dataset-fashion-mnist` package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from promptcil.data.sources.base import (
    DEBIAN_FASHION_MNIST,
    DataError,
    ImageSet,
    Split,
    decompress_atomically,
    one_line,
    register_source,
    torchvision_root,
)


@register_source("fashion_mnist")
def fashion_mnist(cfg: Any, split: Split, image_size: int) -> ImageSet:
    """Fashion-MNIST through torchvision, fed offline from Debian's `dataset-fashion-mnist`.

    Debian recompressed the `.gz` files, so their md5 differ from torchvision's and
    torchvision would reject them; torchvision accepts the decompressed files
    without a checksum, so those are unpacked into `<root>/FashionMNIST/raw` first.
    """
    from torchvision.datasets import FashionMNIST

    root = torchvision_root(cfg)
    raw = root / "FashionMNIST" / "raw"
    names = [Path(name).with_suffix("").name for name, _ in FashionMNIST.resources]
    for name in names:
        packaged = DEBIAN_FASHION_MNIST / f"{name}.gz"
        if not (raw / name).exists() and packaged.exists():
            raw.mkdir(parents=True, exist_ok=True)
            decompress_atomically(packaged, raw / name)
    if not cfg.download and not all((raw / name).exists() for name in names):
        raise DataError(
            f"data.root: Fashion-MNIST is neither in {raw} nor in {DEBIAN_FASHION_MNIST}; "
            "run `apt-get install dataset-fashion-mnist` or set data.download: true"
        )
    try:
        dataset = FashionMNIST(root, train=split == "train", download=cfg.download)
    except (RuntimeError, OSError) as err:
        raise DataError(f"data.download: could not get Fashion-MNIST into {raw}: {one_line(err)}") from err
    return ImageSet(
        images=dataset.data[:, None].contiguous(),
        labels=dataset.targets.to(torch.int64),
        class_names=list(dataset.classes),
    )
