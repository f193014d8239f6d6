"""prepare: load the source data once, fix the class order and tasks, cache the images: uint8 in one file
per split, or (data.shards) the encoded files in WebDataset tar shards with an index."""

from __future__ import annotations

from pathlib import Path

from promptcil.config import Params
from promptcil.data import load_split, make_task_split
from promptcil.data.prepared import drop_other_layout, write_image_set, write_task_split
from promptcil.data.shards import write_shards
from promptcil.data.sources.base import list_files
from promptcil.entry import stage_main
from promptcil.workspace import Workspace


def run(params: Params, workspace: Workspace, *, progress: bool = True) -> dict:
    p = workspace.localise(params)
    out = workspace.out("prepare")
    drop_other_layout(out, p.data.shards)
    if p.data.shards:
        return prepare_shards(p, out, progress=progress)
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


def prepare_shards(p: Params, out: Path, *, progress: bool = False) -> dict:
    """Each split's files packed into shards (checked by decoding each once); no image is held in memory."""
    files = {split: list_files(p.data, split) for split in ("train", "test")}
    names = list(files["train"])
    split = make_task_split(len(names), p.data.base_classes, p.data.classes_per_task, p.data.class_order_seed,
                            p.data.class_order)
    size = getattr(p.data, "image_size", None) or p.backbone.img_size
    counts = {}
    for name in ("train", "test"):
        manifest = write_shards(out, name, files[name], list(split.class_order), size, p.data.shard_images,
                                p.data.source, progress=progress)
        counts[name] = {"samples": sum(s["images"] for s in manifest["metadata"]["shards"]),
                        "shards": len(manifest["metadata"]["shards"]), "sha256": manifest["sha256"]}
    summary = {"split": split.to_dict(), "num_tasks": split.num_tasks,
               "class_names": [names[c] for c in split.class_order], "data": counts}
    write_task_split(out, summary)
    return summary


if __name__ == "__main__":
    stage_main(run, __doc__)
