"""The train stage's folder: task states (what a task taught; what registry versions carry) and the
resumable checkpoints, both safetensors + manifest, plus the producer record that says whose they are.

A checkpoint is committed after every epoch and only the newest is kept; its manifest is the commit
point, so a kill at any moment leaves either the previous checkpoint or the new one. Optimizer state
travels as tensors + JSON (no pickle). A folder another producer wrote is emptied before any work
(`promptcil.provenance`): its checkpoints are never resumed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from promptcil.artifacts import ArtifactError, ArtifactKind, load_tensors, save_tensors, verify
from promptcil.provenance import claim

_CHECKPOINT_NAME = re.compile(r"ckpt-t(\d+)-e(\d+)\.safetensors$")


def task_state_path(folder: Path, task: int) -> Path:
    return Path(folder) / f"task_{task:02d}.safetensors"


def load_task_state(model: Any, path: Path) -> dict[str, Any]:
    """Load a task's trained prompt + head into `model` (an IncrementalModel); returns the manifest metadata."""
    tensors, manifest = load_tensors(path, kind=ArtifactKind.TASK_STATE)
    model.load_trainable_state(tensors)
    return manifest["metadata"]


@dataclass
class ResumePoint:
    task: int
    epoch: int  # epochs of `task` already done
    optimizer_state: dict[str, Any] | None
    epoch_losses: list[float]
    model_state: dict[str, torch.Tensor]
    adapter_state: dict[str, torch.Tensor]  # first-session adaptation's temporary head, mid-task


class CheckpointStore:
    def __init__(self, folder: Path, producer: dict[str, Any]) -> None:
        """
        Args:
            folder: the train stage's folder (or a retrain's run folder).
            producer: `provenance.producer_record` of what the run depends on.
        """
        self.folder = Path(folder)
        self.producer = producer

    @property
    def checkpoints(self) -> Path:
        return self.folder / "checkpoints"

    def claim(self) -> bool:
        """Make the folder this producer's; True when it already was (its checkpoints may be resumed)."""
        return claim(self.folder, self.producer)

    def save_task_state(self, task: int, state: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
        save_tensors(task_state_path(self.folder, task), state, kind=ArtifactKind.TASK_STATE, metadata=metadata)

    def task_metadata(self, task: int) -> dict[str, Any]:
        return verify(task_state_path(self.folder, task))["metadata"]

    def save_checkpoint(
        self,
        task: int,
        epoch: int,
        *,
        task_done: bool,
        model_state: dict[str, torch.Tensor],
        optimizer: torch.optim.Optimizer | None,
        losses: list[float],
        adapter_state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        tensors = {f"model.{k}": v for k, v in model_state.items()}
        if adapter_state is not None:
            tensors |= {f"adapter.{k}": v.detach().clone() for k, v in adapter_state.items()}
        meta: dict[str, Any] = {"task": task, "epoch": epoch, "task_done": task_done, "epoch_losses": losses}
        if optimizer is not None and not task_done:
            opt_tensors, meta["optimizer"] = split_optimizer_state(optimizer.state_dict())
            tensors |= opt_tensors
        path = self.checkpoints / f"ckpt-t{task:03d}-e{epoch:03d}.safetensors"
        save_tensors(path, tensors, kind=ArtifactKind.CHECKPOINT, metadata=meta)
        # keep only the newest committed checkpoint; manifests (the commit points) go first, so a kill
        # in between leaves an uncommitted payload, never a manifest whose payload is gone
        for old in sorted(self.checkpoints.glob("ckpt-*"), key=lambda p: p.suffix != ".json"):
            if old.stem != path.stem:
                old.unlink(missing_ok=True)

    def latest(self) -> ResumePoint | None:
        """Where to continue: the newest committed checkpoint (a task done: the next task's start)."""
        candidates = sorted(
            (int(m[1]), int(m[2]), p) for p in self.checkpoints.glob("ckpt-*.safetensors")
            if (m := _CHECKPOINT_NAME.search(p.name))
        )
        for task, _epoch, path in reversed(candidates):
            try:
                tensors, manifest = load_tensors(path, kind=ArtifactKind.CHECKPOINT)
            except ArtifactError:
                continue  # an interrupted write: no manifest was committed for it
            meta = manifest["metadata"]
            model_state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
            if meta["task_done"]:
                return ResumePoint(task + 1, 0, None, [], model_state, {})
            adapter_state = {k.removeprefix("adapter."): v for k, v in tensors.items() if k.startswith("adapter.")}
            return ResumePoint(task, meta["epoch"], join_optimizer_state(tensors, meta["optimizer"]),
                               meta["epoch_losses"], model_state, adapter_state)
        return None

    def first_epoch_state(self) -> dict[str, torch.Tensor]:
        """The model state of the newest checkpoint (a study's first-epoch probe reads it right after epoch 0)."""
        checkpoint = next(self.checkpoints.glob("ckpt-*.safetensors"))
        tensors, _ = load_tensors(checkpoint, kind=ArtifactKind.CHECKPOINT)
        return {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}


def split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as safetensors tensors + JSON (no pickle)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}
