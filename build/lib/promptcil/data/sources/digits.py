"""scikit-learn's bundled digits: 1 797 real 8x8 handwritten digits, offline (the default data)."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from promptcil.config.base import Section
from promptcil.data.sources.base import ImageSet, Split, register_source


class DigitsFields(Section):
    """digits has no official split: these settings make one."""

    test_fraction: float = Field(
        0.25, gt=0, lt=1, description="digits only: stratified held-out fraction (digits has no official split)."
    )
    split_seed: int = Field(0, description="digits only: seed of the train/test split.")


@register_source("digits", fields=DigitsFields)
def digits(cfg: DigitsFields, split: Split, image_size: int) -> ImageSet:
    """scikit-learn's bundled 8x8 digits: offline, so the default pipeline runs anywhere.

    The dataset has no official split, so a stratified split seeded by
    `data.split_seed` keeps every class in both halves in the same proportion.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    # Pixel values are 0..16; scale to the full uint8 range like every other source.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    train_idx, test_idx = train_test_split(
        np.arange(len(bunch.target)),
        test_size=cfg.test_fraction,
        random_state=cfg.split_seed,
        stratify=bunch.target,
    )
    idx = train_idx if split == "train" else test_idx
    return ImageSet(
        images=torch.from_numpy(images[idx]),
        labels=torch.from_numpy(bunch.target[idx].astype(np.int64)),
        class_names=[str(name) for name in bunch.target_names],
    )
