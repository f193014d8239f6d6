"""features: per-class sums of the frozen backbone's CLS features and of every block's input tokens, the
block x block affinity summed over task 0's images (features.safetensors), and every token entering every
block for a sample of task 0's images (token_sample.safetensors); computed once for every consumer
(prototypes, initialisers). Its size grows with the classes, never with the images."""

from __future__ import annotations

import contextlib
import time

from promptcil.artifacts import ArtifactKind, read_json, save_tensors, saving_in_background, write_json
from promptcil.backbone import load_recorded_backbone
from promptcil.config import Params
from promptcil.data import read_image_set, read_task_split
from promptcil.distributed import barrier, setup
from promptcil.entry import stage_main
from promptcil.features import TOKEN_SAMPLE_FILE, block_token_sample, class_statistics, sample_images
from promptcil.workspace import Workspace


def run(params: Params, workspace: Workspace, *, progress: bool = True) -> dict:
    p = workspace.localise(params)
    ranks, device = setup(p.train.device)  # torchrun: each rank its shard of the images, rank 0 writes
    backbone = load_recorded_backbone(p.backbone, workspace.of("pretrain"), seed=p.train.seed)
    train = read_image_set(workspace.of("prepare"), "train", p.data)
    split = read_task_split(workspace.of("prepare"))
    base = split.task_classes(0)
    out = workspace.out("features")
    sample = sample_images(train, base, p.init.sample_images, p.init.sample_seed)
    # every rank passes its shard of the sample first (work split, and every rank starts the pass equally warm);
    # rank 0 writes the whole while the pass runs (1 GiB at ViT-B/16: hashing and fsync need not stop the GPU)
    tokens = block_token_sample(backbone, sample, p.eval.batch_size, device)
    writing = contextlib.nullcontext()
    if tokens is not None:  # rank 0
        writing = saving_in_background(out / TOKEN_SAMPLE_FILE, {"block_token_sample": tokens},
                                       kind=ArtifactKind.TOKEN_SAMPLE)
    del tokens
    with writing as sampled:
        barrier(ranks)  # every rank has loaded: the time below is the pass, not the ranks' start-up skew
        started = time.perf_counter()
        stats = class_statistics(backbone, train, p.eval.batch_size, device,
                                 num_classes=split.task_classes(split.num_tasks - 1).stop, affinity_classes=base)
        seconds = time.perf_counter() - started  # the pass over every training image, the sums added across ranks
    summary = {"samples": len(train), "token_sample_images": len(sample), "world_size": ranks.world,
               "samples_per_rank": ranks.shard_sizes(len(train)), "seconds": seconds}
    if ranks.writer:  # two files: the token sample is read only by the initialisers that draw from it
        manifest = save_tensors(out / "features.safetensors", stats, kind=ArtifactKind.FEATURES)
        write_json(out / "features_log.json",
                   summary | {"sha256": manifest["sha256"], "token_sample_sha256": sampled.result()["sha256"]})
    return summary


def result(workspace: Workspace) -> dict:
    """What `run` returned, read back from its record (after a run on several processes)."""
    return read_json(workspace.out("features") / "features_log.json")


if __name__ == "__main__":
    stage_main(run, __doc__)
