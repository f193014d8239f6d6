"""prototypes: per-class means of the frozen features (final CLS and every block's input tokens), and the
block x block affinity of task 0's features (SHIP's semantic levels)."""

from __future__ import annotations

import torch

from promptcil.artifacts import ArtifactKind, load_tensors, save_tensors
from promptcil.config import Params
from promptcil.data import read_task_split
from promptcil.entry import stage_main
from promptcil.features import class_means, layer_affinity
from promptcil.workspace import Workspace


def run(params: Params, workspace: Workspace, *, progress: bool = True) -> dict:
    split = read_task_split(workspace.of("prepare"))
    stats, _ = load_tensors(workspace.of("features") / "features.safetensors", kind=ArtifactKind.FEATURES)
    num_classes = split.task_classes(split.num_tasks - 1).stop
    task_of_class = torch.cat([torch.full((len(split.task_classes(t)),), t) for t in range(split.num_tasks)])
    task0 = torch.isin(stats["labels"], torch.as_tensor(list(split.task_classes(0))))
    tensors = {
        "class_features": class_means(stats["cls"], stats["labels"], num_classes),
        "block_class_tokens": class_means(stats["block_input_tokens"], stats["labels"], num_classes).transpose(0, 1),
        "task_of_class": task_of_class,
        # what SHIP groups blocks by: task 0's images only (the data there is before any training)
        "layer_affinity": layer_affinity(stats["block_input_tokens"][task0]),
    }
    save_tensors(workspace.out("prototypes") / "prototypes.safetensors", tensors, kind=ArtifactKind.PROTOTYPES)
    return {"classes": num_classes}


if __name__ == "__main__":
    stage_main(run, __doc__)
