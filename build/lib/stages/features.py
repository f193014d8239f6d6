"""features: frozen-backbone CLS features and per-block input-token statistics of the training data,
plus every token entering every block for a sample of task 0's images; computed once for every
consumer (prototypes, initialisers)."""

from __future__ import annotations

from promptcil.artifacts import ArtifactKind, save_tensors
from promptcil.backbone import load_recorded_backbone
from promptcil.config import Params
from promptcil.data import read_image_set, read_task_split
from promptcil.entry import stage_main
from promptcil.features import backbone_statistics, block_token_sample, sample_images
from promptcil.runtime import resolve_device
from promptcil.workspace import Workspace


def run(params: Params, workspace: Workspace, *, progress: bool = True) -> dict:
    p = workspace.localise(params)
    device = resolve_device(p.train.device)
    backbone = load_recorded_backbone(p.backbone, workspace.of("pretrain"), seed=p.train.seed)
    train = read_image_set(workspace.of("prepare"), "train")
    stats = backbone_statistics(backbone, train, p.eval.batch_size, device)
    classes = read_task_split(workspace.of("prepare")).task_classes(0)
    sample = sample_images(train, classes, p.init.sample_images, p.init.sample_seed)
    stats["block_token_sample"] = block_token_sample(backbone, sample, p.eval.batch_size, device)
    manifest = save_tensors(workspace.out("features") / "features.safetensors", stats, kind=ArtifactKind.FEATURES)
    return {"samples": len(stats["labels"]), "token_sample_images": len(sample), "sha256": manifest["sha256"]}


if __name__ == "__main__":
    stage_main(run, __doc__)
