"""prepare: load the source data once, fix the class order and tasks, cache uint8 images."""

from __future__ import annotations

from promptcil.config import Params
from promptcil.data import load_split, make_task_split
from promptcil.data.prepared import write_image_set, write_task_split
from promptcil.entry import stage_main
from promptcil.workspace import Workspace


def run(params: Params, workspace: Workspace, *, progress: bool = True) -> dict:
    p = workspace.localise(params)
    out = workspace.out("prepare")
    train = load_split(p.data, "train", p.backbone.img_size)
    test = load_split(p.data, "test", p.backbone.img_size)
    split = make_task_split(
        len(train.class_names), p.data.base_classes, p.data.classes_per_task, p.data.class_order_seed,
        p.data.class_order,
    )
    train, test = split.relabel(train), split.relabel(test)
    counts = {}
    for name, data in (("train", train), ("test", test)):
        manifest = write_image_set(out, name, data, p.data.source)
        counts[name] = {"samples": len(data), "sha256": manifest["sha256"]}
    summary = {"split": split.to_dict(), "num_tasks": split.num_tasks, "class_names": train.class_names, "data": counts}
    write_task_split(out, summary)
    return summary


if __name__ == "__main__":
    stage_main(run, __doc__)
