"""prepare: load the source data once, fix the class order and tasks, cache uint8 images."""

from __future__ import annotations

import sys
from pathlib import Path

from promptcil.artifacts import save_tensors, write_json
from promptcil.data import load_split, make_task_split

from stages.common import DATA_KIND, PREPARE, params, run_stage


def prepare(params_path: str | Path = "params.yaml", out: Path = PREPARE) -> dict:
    p = params(params_path)
    train = load_split(p.data, "train", p.backbone.img_size)
    test = load_split(p.data, "test", p.backbone.img_size)
    split = make_task_split(
        len(train.class_names), p.data.base_classes, p.data.classes_per_task, p.data.class_order_seed,
        p.data.class_order,
    )
    counts = {}
    train, test = split.relabel(train), split.relabel(test)
    for name, data in (("train", train), ("test", test)):
        manifest = save_tensors(
            out / f"{name}.safetensors", {"images": data.images, "labels": data.labels}, kind=DATA_KIND,
            metadata={"class_names": data.class_names, "source": p.data.source},
        )
        counts[name] = {"samples": len(data), "sha256": manifest["sha256"]}
    summary = {
        "split": split.to_dict(), "num_tasks": split.num_tasks, "class_names": train.class_names, "data": counts,
    }
    write_json(out / "tasks.json", summary)
    return summary


if __name__ == "__main__":
    run_stage(prepare, *sys.argv[1:2])
