"""The features stage (class_statistics) from uint8 host images, the loader alone, and where its time goes."""

from __future__ import annotations

import statistics
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from promptcil.data import ImageSet, make_loader
from promptcil.features import class_statistics
from promptcil.runtime import autocast_for

from harness.inputs import Run, random_imageset
from harness.timing import wall


def features_rate(run: Run, backbone: VisionTransformer, batches: int) -> dict[str, Any]:
    """class_statistics (the features stage) end to end from uint8 images in host memory, wall clock,
    median of 3 passes after a 2-batch warm-up, over `batches` batches (the target's row: a stage runs over
    a whole training set) and over a quarter of them (what a fixed cost per call weighs on a short pass);
    the loader alone (host gather, pinning, copy to device); and a breakdown (features_breakdown)."""
    count = batches * run.batch_size
    size = tuple(backbone.patch_embed.img_size)
    data = random_imageset(count, backbone.patch_embed.proj.in_channels, size, torch.zeros(count, dtype=torch.int64), 1)
    quarter = max(1, batches // 4) * run.batch_size
    short = ImageSet(data.images[:quarter], data.labels[:quarter], data.class_names)
    warm = ImageSet(data.images[: 2 * run.batch_size], data.labels[: 2 * run.batch_size], data.class_names)

    def stage(images: ImageSet) -> None:  # every image is class 0 here
        class_statistics(backbone, images, run.batch_size, run.device, num_classes=1, affinity_classes=range(1))

    stage(warm)
    stage_s = [wall(run, lambda: stage(data)) for _ in range(3)]
    short_s = [wall(run, lambda: stage(short)) for _ in range(3)]

    def load_all() -> None:
        for images, _ in make_loader(data, run.batch_size, shuffle=False, seed=0, pin_memory=run.device.type == "cuda"):
            images.to(run.device, non_blocking=True)

    load_all()
    loader_s = [wall(run, load_all) for _ in range(3)]
    breakdown = features_breakdown(run, backbone, data)
    breakdown["short_pass"] = quarter / statistics.median(short_s)
    return {"img_per_s": count / statistics.median(stage_s), "loader_img_per_s": count / statistics.median(loader_s),
            "images": count, "seconds": stage_s, "breakdown": breakdown}


@torch.no_grad()
def features_breakdown(run: Run, backbone: VisionTransformer, data: ImageSet) -> dict[str, float]:
    """Where the features stage's time goes (img/s, wall clock, median of 3 passes over the same images):
    - loader_fed_forward: the plain forward fed by the stage's loader, each batch copied to the device on
      the compute stream (no copy ahead), nothing kept;
    - with_block_means: the same plus the stage's per-block patch-token means, kept on the device;
    - device_outputs: the per-image outputs (backbone_statistics' work) kept on the device and copied to
      (pageable) host memory once at the end, instead of through its ring of page-locked staging buffers."""
    from promptcil.backbone import embed_tokens
    from promptcil.data import DevicePreprocess

    preprocess = DevicePreprocess.from_model(backbone).to(run.device)
    prefix, pin = backbone.num_prefix_tokens, run.device.type == "cuda"
    count, depth, dim = len(data), len(backbone.blocks), backbone.embed_dim

    def passes(keep_means: bool, to_host: bool) -> None:
        cls_out = torch.empty((count, dim), device=run.device)
        block_out = torch.empty((count, depth, dim), device=run.device)
        start = 0
        for images, _ in make_loader(data, run.batch_size, shuffle=False, seed=0, pin_memory=pin):
            with autocast_for(run.device):
                tokens = embed_tokens(backbone, preprocess(images.to(run.device, non_blocking=True)))
                means = []
                for block in backbone.blocks:
                    if keep_means:
                        means.append(tokens[:, prefix:].mean(dim=1))
                    tokens = block(tokens)
                cls = backbone.forward_head(backbone.norm(tokens), pre_logits=True)
            stop = start + cls.shape[0]
            if keep_means:
                cls_out[start:stop] = cls
                block_out[start:stop] = torch.stack(means, dim=1)
            start = stop
        if to_host:
            cls_out.cpu(), block_out.cpu()

    rates = {}
    for key, keep, host in (("loader_fed_forward", False, False), ("with_block_means", True, False),
                            ("device_outputs", True, True)):
        passes(keep, host)
        rates[key] = count / statistics.median(wall(run, lambda: passes(keep, host)) for _ in range(3))
    return rates
