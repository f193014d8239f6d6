"""pretrain: the frozen backbone's weights. Trained here when backbone.source is `pretrain` (on the
base classes, an upstream data set or rendered fractals: backbone.pretrain.data); otherwise only the
reference and its weights' sha256 are recorded. Fractal images are regenerated from their parameters
(versioned in params.yaml) on every run and never written: only the weights are."""

from __future__ import annotations

import time

from promptcil.artifacts import ArtifactKind, read_json, save_tensors, write_json
from promptcil.backbone import WEIGHTS_FILE, load_backbone, weights_fingerprint
from promptcil.config import DataConfig, Params
from promptcil.data import ImageSet, fractal_images, load_split, read_image_set, read_task_split, subset
from promptcil.distributed import barrier, samples_per_rank, setup
from promptcil.entry import stage_main
from promptcil.pretrain import pretrain_backbone
from promptcil.runtime import resolve_device
from promptcil.workspace import Workspace


def run(params: Params, workspace: Workspace, *, progress: bool = True) -> dict:
    p = workspace.localise(params)
    ranks, device = setup(p.train.device)  # torchrun: this rank's place; one process: (rank 0 of 1, the device)
    out = workspace.out("pretrain")
    info: dict = {"name": p.backbone.name, "source": p.backbone.source, "world_size": ranks.world}
    if p.backbone.source == "pretrain":
        started = time.perf_counter()
        data = pretraining_data(p, workspace, progress=progress)
        barrier(ranks)  # every rank has its data: the time below is training, not the ranks' start-up skew
        loaded = time.perf_counter()
        pretrained = pretrain_backbone(p.backbone, data, device, seed=p.train.seed, progress=progress, ranks=ranks)
        model = pretrained.model
        info |= {"data": p.backbone.pretrain.data, "train_images": len(data),
                 "classes": int(data.labels.unique().numel()), "epoch_losses": pretrained.epoch_losses,
                 "epoch_seconds": pretrained.epoch_seconds, "compiled": pretrained.compiled,
                 "compile_cache": pretrained.compile_cache,
                 "samples_per_rank": samples_per_rank(len(data), p.backbone.pretrain.batch_size, ranks.world),
                 "data_seconds": loaded - started, "seconds": time.perf_counter() - loaded}
        if ranks.writer:
            save_tensors(out / WEIGHTS_FILE, model.state_dict(), kind=ArtifactKind.BACKBONE,
                         metadata={"name": p.backbone.name})
    else:
        model = load_backbone(p.backbone, seed=p.train.seed)
        info["file"] = str(params.backbone.file) if params.backbone.file else None
    info["weights_sha256"] = weights_fingerprint(model)
    if ranks.writer:
        write_json(out / "backbone.json", info)
    return info


def pretraining_data(p: Params, workspace: Workspace, *, progress: bool = False) -> ImageSet:
    """Task 0 of the prepared data, every class of an upstream data set's train split, or fractals
    rendered at the backbone's resolution on the stage's device."""
    upstream = p.backbone.pretrain.data
    if upstream == "base_classes":
        prepared = workspace.of("prepare")
        return subset(read_image_set(prepared, "train", p.data), list(read_task_split(prepared).task_classes(0)))
    if upstream == "fractal":
        return fractal_images(p.backbone.pretrain.fractal, p.backbone.img_size, resolve_device(p.train.device),
                              progress=progress)
    return load_split(DataConfig(source=upstream, root=p.backbone.pretrain.root), "train", p.backbone.img_size)


def result(workspace: Workspace) -> dict:
    """What `run` returned, read back from its record (after a run on several processes)."""
    return read_json(workspace.out("pretrain") / "backbone.json")


if __name__ == "__main__":
    stage_main(run, __doc__)
