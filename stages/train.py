"""train: task by task on each task's data only; resumable (a rerun with the same params and inputs
continues from the last checkpoint; other params or inputs start clean)."""

from __future__ import annotations

from collections.abc import Callable

from promptcil.artifacts import read_json, write_json
from promptcil.config import Params
from promptcil.data import read_image_set, read_task_split
from promptcil.data.prepared import TASKS_FILE, images_sha256
from promptcil.distributed import samples_per_rank, setup
from promptcil.entry import stage_main
from promptcil.model import build_model
from promptcil.provenance import artifact_sha256, file_sha256, producer_record
from promptcil.training import IncrementalTrainer
from promptcil.workspace import Workspace


def run(params: Params, workspace: Workspace, *, progress: bool = True,
        on_epoch_end: Callable[[int, int], None] | None = None) -> dict:
    """Train every task; `on_epoch_end(task, epoch)` runs after each committed checkpoint (studies use it)."""
    p = workspace.localise(params)
    ranks, device = setup(p.train.device)  # torchrun: each rank its shard of every batch, rank 0 writes
    prepared, prompt_init, out = workspace.of("prepare"), workspace.of("prompt_init"), workspace.out("train")
    split = read_task_split(prepared)
    model = build_model(p, workspace.of("pretrain"), prompt_init=prompt_init / "prompt.safetensors")
    producer = producer_record(
        {"method": p.method.model_dump(mode="json"), "head": p.head.model_dump(mode="json"),
         "train": p.train.model_dump(mode="json")},
        {"tasks": file_sha256(prepared / TASKS_FILE), "train_images": images_sha256(prepared, "train"),
         "backbone": read_json(workspace.of("pretrain") / "backbone.json")["weights_sha256"],
         "prompt_init": artifact_sha256(prompt_init / "prompt.safetensors")},
    )
    trainer = IncrementalTrainer(model, split, p.train, out, device, progress=progress, on_epoch_end=on_epoch_end,
                                 producer=producer, ranks=ranks)
    logs = trainer.run(read_image_set(prepared, "train", p.data))
    summary = {
        "tasks": split.num_tasks,
        "device": str(trainer.device),
        "world_size": ranks.world,
        "compiled": trainer.compiled,  # train.compile: whether this run compiled (auto decides by its steps)
        "images_forwarded": trainer.model.preprocess.images_seen,  # steps' and the heads' passes, this rank
        "log": [{"task": g.task, "samples": g.samples, "epoch_losses": g.epoch_losses, "seconds": g.seconds,
                 "end_seconds": g.end_seconds,
                 "samples_per_rank": samples_per_rank(g.samples, p.train.batch_size, ranks.world)} for g in logs],
    }
    if ranks.writer:
        write_json(out / "train_log.json", summary)
    return summary


def result(workspace: Workspace) -> dict:
    """What `run` returned, read back from its record (after a run on several processes)."""
    return read_json(workspace.out("train") / "train_log.json")


if __name__ == "__main__":
    stage_main(run, __doc__)
