"""Shared fixtures: real digits data, a tiny real timm ViT, and one backbone pretrained once per session."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from promptcil.config import Params, parse_params
from promptcil.data import ImageSet, TaskSplit, load_split, make_task_split, subset
from promptcil.pretrain import pretrain_backbone

torch.set_num_threads(2)

# A ViT small enough for CPU tests: 8x8 digits at 16 px, 16 patches of 4x4.
TINY_BACKBONE = {"img_size": 16, "patch_size": 4, "depth": 4, "embed_dim": 48, "num_heads": 3}


def make_params(**sections: dict) -> Params:
    raw: dict = {"backbone": dict(TINY_BACKBONE), "train": {"epochs": 2, "batch_size": 32}}
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return parse_params(raw)


@dataclass
class DigitsTasks:
    split: TaskSplit
    train: ImageSet  # incremental labels
    test: ImageSet


@pytest.fixture(scope="session")
def digits_tasks() -> DigitsTasks:
    """Digits as B4 + 3 tasks of 2 (seeded class order)."""
    params = make_params()
    split = make_task_split(10, 4, 2, params.data.class_order_seed)
    train = split.relabel(load_split(params.data, "train", 16))
    test = split.relabel(load_split(params.data, "test", 16))
    return DigitsTasks(split, train, test)


@pytest.fixture(scope="session")
def pretrained_backbone(digits_tasks: DigitsTasks):
    """The B-N protocol's backbone: trained on the base classes only, then frozen."""
    params = make_params(backbone={"source": "pretrain", "pretrain": {"epochs": 60, "lr": 2e-3}})
    base = subset(digits_tasks.train, list(digits_tasks.split.task_classes(0)))
    backbone, _ = pretrain_backbone(params.backbone, base, torch.device("cpu"), progress=False)
    return backbone
