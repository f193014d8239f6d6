"""features: frozen-backbone CLS features and per-block input-token statistics of the training data,
plus every token entering every block for a sample of task 0's images; computed once for every
consumer (prototypes, initialisers)."""

from __future__ import annotations

import time

from promptcil.artifacts import ArtifactKind, read_json, save_tensors, write_json
from promptcil.backbone import load_recorded_backbone
from promptcil.config import Params
from promptcil.data import read_image_set, read_task_split
from promptcil.distributed import barrier, setup
from promptcil.entry import stage_main
from promptcil.features import backbone_statistics, block_token_sample, sample_images
from promptcil.workspace import Workspace


def run(params: Params, workspace: Workspace, *, progress: bool = True) -> dict:
    p = workspace.localise(params)
    ranks, device = setup(p.train.device)  # torchrun: each rank its shard of the images, rank 0 writes
    backbone = load_recorded_backbone(p.backbone, workspace.of("pretrain"), seed=p.train.seed)
    train = read_image_set(workspace.of("prepare"), "train")
    barrier(ranks)  # every rank has loaded: the time below is the pass, not the ranks' start-up skew
    started = time.perf_counter()
    stats = backbone_statistics(backbone, train, p.eval.batch_size, device)
    seconds = time.perf_counter() - started  # the pass over every training image, gathered on every rank
    classes = read_task_split(workspace.of("prepare")).task_classes(0)
    sample = sample_images(train, classes, p.init.sample_images, p.init.sample_seed)
    summary = {"samples": len(stats["labels"]), "token_sample_images": len(sample), "world_size": ranks.world,
               "samples_per_rank": ranks.shard_sizes(len(train)), "seconds": seconds}
    if ranks.writer:  # the token sample is small: rank 0 computes it alone
        stats["block_token_sample"] = block_token_sample(backbone, sample, p.eval.batch_size, device)
        manifest = save_tensors(workspace.out("features") / "features.safetensors", stats,
                                kind=ArtifactKind.FEATURES)
        write_json(workspace.out("features") / "features_log.json", summary | {"sha256": manifest["sha256"]})
    return summary


def result(workspace: Workspace) -> dict:
    """What `run` returned, read back from its record (after a run on several processes)."""
    return read_json(workspace.out("features") / "features_log.json")


if __name__ == "__main__":
    stage_main(run, __doc__)
