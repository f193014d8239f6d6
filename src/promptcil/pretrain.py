"""Supervised pretraining of the backbone on the base classes (the classic B-N protocol).

No pretrained ViT weights exist offline, so the pipeline makes its own: the
ViT plus a temporary linear classifier is trained on task 0's classes only,
then the classifier is dropped and the backbone frozen. The incremental tasks'
classes are never seen, so what the prompts add on them is measurable.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from timm.models.vision_transformer import VisionTransformer
from torch.nn.parallel import DistributedDataParallel

from promptcil.backbone import create_vit, freeze
from promptcil.compiling import aot_cache_counts, compile_cache, should_compile
from promptcil.config.sections import BackboneConfig
from promptcil.data import DevicePreprocess, ImageSet, device_batches
from promptcil.distributed import SINGLE, Ranks, all_reduce_sum_
from promptcil.runtime import autocast_for


def shift_offsets(max_shift: int, generator: torch.Generator) -> tuple[int, int]:
    """A batch's (dx, dy), drawn for every batch on every rank (an empty shard too), so the ranks stay in step."""
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()
    return dx, dy


def random_shift(images: torch.Tensor, max_shift: int, offsets: tuple[int, int]) -> torch.Tensor:
    """Pad-and-crop augmentation on the device: the cheapest augmentation that helps tiny data."""
    if max_shift == 0:
        return images
    padded = F.pad(images, [max_shift] * 4, mode="replicate")
    dx, dy = offsets
    h, w = images.shape[-2:]
    # contiguous: the same layout for every offset, where a view's storage offset would make a compiled forward
    # (backbone.pretrain.compile) compile again (the patch embedding's convolution copies a view anyway)
    return padded[..., dy : dy + h, dx : dx + w].contiguous()


@dataclass
class Pretrained:
    """A pretraining's frozen backbone and what its record reports: per-epoch losses and seconds (the first
    epoch carries the warm-up: DDP's bucket rebuild, every kernel's first call, a compilation), whether the
    forward was compiled (backbone.pretrain.compile) and, if so, how AOTAutograd's cache served this process's
    graphs (`aot_cache_counts`: a warm cache's run is all hits; the stage records rank 0's)."""

    model: VisionTransformer
    epoch_losses: list[float]
    epoch_seconds: list[float]
    compiled: bool
    compile_cache: dict[str, int] | None


def training_forward(model: torch.nn.Module, device: torch.device, ranks: Ranks, *, compiled: bool) -> torch.nn.Module:
    """What a pretraining step calls: the model, compiled if asked (its cache: `compile_cache`), in DDP under
    torchrun. Compiled inside DDP, so that Dynamo traces none of DDP's Python and one process compiles the same
    graph, and as one graph there (`OneGraphUnderDDP`)."""
    forward = model
    if compiled:
        compile_cache()
        forward = torch.compile(model)
    if ranks.distributed:  # gradient_as_bucket_view: gradients are views into DDP's all-reduce buckets, not copies
        # timm's class token gets a strided gradient (a 1 x D view): harmless, DDP warns
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        forward = DistributedDataParallel(OneGraphUnderDDP(forward) if compiled else forward,
                                          device_ids=[device.index] if device.type == "cuda" else None,
                                          gradient_as_bucket_view=True)
    return forward


class OneGraphUnderDDP(torch.nn.Module):
    """A compiled module that compiles as one graph when DDP calls it: Dynamo's DDPOptimizer is off while it runs,
    which is when Dynamo compiles (and would compile again). The split the optimizer makes at DDP's gradient
    buckets lets their all-reduces overlap the backward, but AOTAutograd's cache refuses split graphs
    ("fakify_first_call"), so every run would trace and partition each part again: ViT-B's 13 parts cost ~21 s a
    run on two H200s, and the stage's later epochs ran no faster split (docs/scaling.md)."""

    def __init__(self, compiled: torch.nn.Module) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        with torch._dynamo.config.patch(optimize_ddp=False):
            return self.compiled(*args)


def pretraining_step(
    forward: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor, *,
    loss_scale: float, label_smoothing: float, device: torch.device,
) -> torch.Tensor:
    """One optimizer step on a preprocessed batch; returns its summed loss, detached. The backward runs on the
    summed loss times `loss_scale`: the world size over the global batch's size (see `pretrain_backbone`)."""
    optimizer.zero_grad(set_to_none=True)
    with autocast_for(device):
        summed = F.cross_entropy(forward(images).float(), labels, label_smoothing=label_smoothing, reduction="sum")
    (summed * loss_scale).backward()
    optimizer.step()
    return summed.detach()


def pretrain_backbone(
    cfg: BackboneConfig,
    data: ImageSet,
    device: torch.device,
    *,
    seed: int = 0,
    progress: bool = True,
    ranks: Ranks = SINGLE,
) -> Pretrained:
    """Train a fresh ViT on `data` (labels 0..K-1) and return it frozen, with its epochs' losses and seconds.
    With `ranks` (torchrun), the model is wrapped in DistributedDataParallel (eager: bucketed all-reduces
    overlapped with the backward pass; compiled: after it, see `OneGraphUnderDDP`) and each rank trains on its
    shard of every batch: its loss is its rows' summed loss over the global batch's size, times the world size
    that DDP's average divides by, so the step is the one-process step up to the order of float additions (an
    empty shard adds zero)."""
    num_classes = int(data.labels.max()) + 1
    torch.manual_seed(seed)  # seeds every device's generator: the initial weights are a function of (seed, device)
    with torch.device(device):  # initialised where it trains: ViT-B's random init is ~1 s on a CPU, ms on a GPU
        model = create_vit(cfg, num_classes=num_classes)
    preprocess = DevicePreprocess.from_model(model).to(device)
    p = cfg.pretrain
    steps = p.epochs * math.ceil(len(data) / p.batch_size)
    compiled = should_compile(p.compile, device, steps)
    forward = training_forward(model, device, ranks, compiled=compiled)
    # on CUDA one fused kernel per step: the optimizer's work is the same on every rank, so its launch
    # overhead is the part of a step that more GPUs do not shorten
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=p.lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    max_shift = max(1, cfg.img_size // 16)
    losses: list[float] = []
    seconds: list[float] = []
    cache_before = aot_cache_counts()
    started = time.perf_counter()
    with Progress(TextColumn("[bold]pretrain"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not (progress and ranks.writer), transient=True) as bar:
        bar_id = bar.add_task("pretrain", total=steps)
        for epoch in range(p.epochs):
            model.train()
            total = torch.zeros((), device=device)
            batches = device_batches(data, p.batch_size, device, shuffle=True, seed=seed * 7919 + epoch, ranks=ranks)
            for step, (images, labels) in enumerate(batches):
                offsets = shift_offsets(max_shift, generator)
                batch = min(p.batch_size, len(data) - step * p.batch_size)  # the global batch's size
                images = random_shift(preprocess(images), max_shift, offsets)
                if compiled:  # an epoch's last, smaller batch reuses the graph instead of compiling a second
                    torch._dynamo.maybe_mark_dynamic(images, 0)
                total += pretraining_step(forward, optimizer, images, labels, loss_scale=ranks.world / batch,
                                          label_smoothing=p.label_smoothing, device=device)  # 1 process: the mean
                scheduler.step()
                bar.advance(bar_id)
            all_reduce_sum_([total], ranks)
            losses.append(float(total) / len(data))  # waits for the epoch's work: its end on the clock
            seconds.append(time.perf_counter() - started - sum(seconds))
    model.reset_classifier(0)
    cache = {k: n - cache_before[k] for k, n in aot_cache_counts().items()} if compiled else None
    return Pretrained(freeze(model.cpu()), losses, seconds, compiled, cache)
