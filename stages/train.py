"""train: task by task on each task's data only; resumable (reruns continue from the last checkpoint)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

from promptcil.artifacts import load_tensors, read_json, write_json
from promptcil.backbone import load_recorded_backbone
from promptcil.model import IncrementalModel
from promptcil.provenance import artifact_sha256, file_sha256, producer_record
from promptcil.train import IncrementalTrainer

from stages.common import (
    BACKBONE, PREPARE, PROMPT_INIT, TRAIN, device_for, image_set, params, run_stage, task_split,
)


def build_model(p, device: torch.device | None = None, init: bool = True) -> IncrementalModel:
    """The model the pipeline trains and evaluates: params' method and head on the recorded backbone,
    the prompt starting from the prompt_init stage's artifact (`init=False`: the seeded random init)."""
    backbone = load_recorded_backbone(p.backbone, BACKBONE, seed=p.train.seed)
    torch.manual_seed(p.train.seed)
    model = IncrementalModel.from_params(p, backbone)
    if init:
        prompt, _ = load_tensors(PROMPT_INIT / "prompt.safetensors", kind="prompt_init")
        model.method.load_state_dict(prompt)
    return model.to(device) if device is not None else model


def train(
    params_path: str | Path = "params.yaml",
    out: Path = TRAIN,
    progress: bool = True,
    on_epoch_end: Callable[[int, int], None] | None = None,
) -> dict:
    """Train every task; `on_epoch_end(task, epoch)` runs after each committed checkpoint (studies use it)."""
    p = params(params_path)
    split = task_split()
    model = build_model(p)
    producer = producer_record(
        {"method": p.method.model_dump(mode="json"), "head": p.head.model_dump(mode="json"),
         "train": p.train.model_dump(mode="json")},
        {"tasks": file_sha256(PREPARE / "tasks.json"), "train_images": artifact_sha256(PREPARE / "train.safetensors"),
         "backbone": read_json(BACKBONE / "backbone.json")["weights_sha256"],
         "prompt_init": artifact_sha256(PROMPT_INIT / "prompt.safetensors")},
    )
    trainer = IncrementalTrainer(model, split, p.train, out, device_for(p), progress=progress,
                                 on_epoch_end=on_epoch_end, producer=producer)
    logs = trainer.run(image_set("train"))
    summary = {
        "tasks": split.num_tasks,
        "device": str(trainer.device),
        "log": [{"task": g.task, "samples": g.samples, "epoch_losses": g.epoch_losses,
                 "seconds": g.seconds} for g in logs],
    }
    write_json(out / "train_log.json", summary)
    return summary


if __name__ == "__main__":
    run_stage(train, *sys.argv[1:2])
