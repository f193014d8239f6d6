"""prototypes: per-class means of the frozen features (final CLS and every block's input tokens), and the
block x block affinity of task 0's features (SHIP's semantic levels), from the features stage's sums."""

from __future__ import annotations

import torch

from promptcil.artifacts import ArtifactKind, load_tensors, save_tensors
from promptcil.config import Params
from promptcil.data import read_task_split
from promptcil.entry import stage_main
from promptcil.features import means_of
from promptcil.workspace import Workspace


def run(params: Params, workspace: Workspace, *, progress: bool = True) -> dict:
    split = read_task_split(workspace.of("prepare"))
    stats, _ = load_tensors(workspace.of("features") / "features.safetensors", kind=ArtifactKind.FEATURES)
    num_classes = split.task_classes(split.num_tasks - 1).stop
    task_of_class = torch.cat([torch.full((len(split.task_classes(t)),), t) for t in range(split.num_tasks)])
    # layer_affinity: over task 0's images only (the data there is before any training)
    tensors = {**means_of(stats), "task_of_class": task_of_class}
    save_tensors(workspace.out("prototypes") / "prototypes.safetensors", tensors, kind=ArtifactKind.PROTOTYPES)
    return {"classes": num_classes}


if __name__ == "__main__":
    stage_main(run, __doc__)
