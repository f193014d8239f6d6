"""What every stage shares: the outputs layout and reading the prepared data."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

from promptcil.artifacts import ArtifactError, load_tensors, read_json
from promptcil.backbone import BackboneError
from promptcil.config import ConfigError, Params, load_params
from promptcil.data import DataError, ImageSet, TaskSplit
from promptcil.runtime import resolve_device

OUT = Path("outputs")
PREPARE = OUT / "prepare"
BACKBONE = OUT / "backbone"
FEATURES = OUT / "features"
PROTOTYPES = OUT / "prototypes"
PROMPT_INIT = OUT / "prompt_init"
TRAIN = OUT / "train"
EVALUATE = OUT / "evaluate"
REGISTER = OUT / "register"
DATA_KIND = "image_data"


def run_stage(stage: Callable[..., object], *args: str) -> None:
    """Run a stage as a script: known problems end in one line on stderr and exit code 2, no traceback."""
    try:
        stage(*args)
    except (ConfigError, DataError, ArtifactError, BackboneError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def params(path: str | Path = "params.yaml") -> Params:
    return load_params(path)


def task_split(prepare_dir: Path = PREPARE) -> TaskSplit:
    return TaskSplit.from_dict(read_json(prepare_dir / "tasks.json")["split"])


def image_set(split: str, prepare_dir: Path = PREPARE) -> ImageSet:
    """The prepared (relabelled, uint8) images of `split`."""
    tensors, manifest = load_tensors(prepare_dir / f"{split}.safetensors", kind=DATA_KIND)
    return ImageSet(tensors["images"], tensors["labels"], manifest["metadata"]["class_names"])


def device_for(p: Params) -> torch.device:
    return resolve_device(p.train.device)
