"""Frozen-backbone statistics computed once per pipeline run (the `features` stage).

Per class, summed over its training images in one pass (`class_statistics`, a size that does not grow with
the data): the final CLS feature (what prototype heads and SimpleCIL use) and, for every block, the mean
patch token ENTERING that block (what the class-prototype initialiser needs); their means are the
prototypes. Over task 0's images, the block x block affinity of those tokens (SHIP's levels). For a small
seeded sample of task 0's images: every patch token entering every block (what the sampled_tokens and SPT
initialisers draw from). `backbone_statistics` keeps the per-image values, for analysis and tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from promptcil.backbone import embed_tokens
from promptcil.data import DevicePreprocess, ImageSet, device_batches
from promptcil.distributed import all_reduce_sum_, gather_rows_to_writer, shard_of
from promptcil.runtime import HostSink, autocast_for


def _entering_tokens(
    backbone: VisionTransformer, data: ImageSet, batch_size: int, device: torch.device, *, with_output: bool = False
) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Per batch: the final CLS feature and, for every block, the patch tokens entering it (prefix tokens
    dropped); `with_output` appends the patch tokens leaving the last block."""
    for cls, entering, _ in _entering_tokens_labelled(backbone, data, batch_size, device, with_output=with_output):
        yield cls, entering


def _entering_tokens_labelled(
    backbone: VisionTransformer, data: ImageSet, batch_size: int, device: torch.device, *, with_output: bool = False
) -> Iterator[tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]]:
    """`_entering_tokens` with each batch's labels (on the device)."""
    backbone.eval().to(device)
    preprocess = DevicePreprocess.from_model(backbone).to(device)
    prefix = backbone.num_prefix_tokens
    for images, labels in device_batches(data, batch_size, device):
        with autocast_for(device):
            tokens = embed_tokens(backbone, preprocess(images))
            entering = []
            for block in backbone.blocks:
                entering.append(tokens[:, prefix:])
                tokens = block(tokens)
            if with_output:
                entering.append(tokens[:, prefix:])
            cls = backbone.forward_head(backbone.norm(tokens), pre_logits=True)
        yield cls, entering, labels.to(device, non_blocking=True)


TOKEN_SAMPLE_FILE = "token_sample.safetensors"
"""The features stage's token sample, beside features.safetensors (the class sums)."""

TOKEN_BATCH_BYTES = 256 * 2**20
"""Token-sample batches are cut to about this many bytes of output (each of HostSink's staging slots)."""


@torch.no_grad()
def backbone_statistics(
    backbone: VisionTransformer, data: ImageSet, batch_size: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """{"cls": (N, D), "block_input_tokens": (N, depth, D), "labels": (N,)} in data order, float32 on CPU;
    block_input_tokens is each image's mean patch token entering each block (per-image values, for analysis
    and tests; the features stage keeps `class_statistics`)."""
    depth, dim = len(backbone.blocks), backbone.embed_dim
    sink = HostSink({"cls": (dim,), "block_input_tokens": (depth, dim)}, len(data), batch_size, device)
    for cls, entering in _entering_tokens(backbone, data, batch_size, device):
        sink.put(cls=cls, block_input_tokens=torch.stack([t.mean(dim=1) for t in entering], dim=1))
    return {**sink.finish(), "labels": data.labels.clone()}


@torch.no_grad()
def class_statistics(
    backbone: VisionTransformer, data: ImageSet, batch_size: int, device: torch.device, num_classes: int,
    affinity_classes: range,
) -> dict[str, torch.Tensor]:
    """What the later stages need from every training image, accumulated in one pass on the device, of a
    size that does not grow with the images (O(classes x depth x D)), float64 on the CPU:

    - class_counts (C,), class_cls_sums (C, D): the final CLS feature summed per class;
    - class_block_sums (C, depth, D): each image's mean patch token entering each block, summed per class;
    - affinity_sum (depth, depth), affinity_images (): over the images of `affinity_classes` (task 0), each
      image's block x block cosine affinity of those tokens, summed, and how many images (SHIP's levels).

    Means are sums over counts (`prototypes` stage). The values summed are the float32 ones the per-image
    outputs held, in data order, so the means are those of `backbone_statistics` + `class_means` and
    `layer_affinity`. Under torchrun each rank passes its shard and the sums are added across ranks."""
    depth, dim = len(backbone.blocks), backbone.embed_dim
    local, ranks = shard_of(data)
    like = {"dtype": torch.float64, "device": device}
    sums = {"class_counts": torch.zeros(num_classes, **like), "class_cls_sums": torch.zeros(num_classes, dim, **like),
            "class_block_sums": torch.zeros(num_classes, depth, dim, **like),
            "affinity_sum": torch.zeros(depth, depth, **like), "affinity_images": torch.zeros((), **like)}
    in_affinity = torch.zeros(num_classes, dtype=torch.bool, device=device)
    in_affinity[affinity_classes.start:affinity_classes.stop] = True
    for cls, entering, labels in _entering_tokens_labelled(backbone, local, batch_size, device):
        tokens = torch.stack([t.mean(dim=1) for t in entering], dim=1).float().double()  # (B, depth, D)
        sums["class_counts"].index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        sums["class_cls_sums"].index_add_(0, labels, cls.float().double())
        sums["class_block_sums"].index_add_(0, labels, tokens)
        # weighted by membership, not selected: selecting rows would wait for the GPU (a data-dependent shape)
        counted = in_affinity[labels].double()
        unit = F.normalize(tokens, dim=-1)
        sums["affinity_sum"] += torch.einsum("b,bij,bkj->ik", counted, unit, unit)
        sums["affinity_images"] += counted.sum()
    all_reduce_sum_(list(sums.values()), ranks)
    return {name: value.cpu() for name, value in sums.items()}


def means_of(statistics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`class_statistics` -> float32 class_features (C, D), block_class_tokens (depth, C, D) and
    layer_affinity (depth, depth); a class without images is an error."""
    counts = statistics["class_counts"]
    if (counts == 0).any():
        raise ValueError(f"no samples for classes {(counts == 0).nonzero().flatten().tolist()}")
    return {"class_features": (statistics["class_cls_sums"] / counts[:, None]).float(),
            "block_class_tokens": (statistics["class_block_sums"] / counts[:, None, None]).float().transpose(0, 1),
            "layer_affinity": (statistics["affinity_sum"] / statistics["affinity_images"]).float()}


@torch.no_grad()
def block_token_sample(
    backbone: VisionTransformer, data: ImageSet, batch_size: int, device: torch.device
) -> torch.Tensor | None:
    """(depth + 1, N, patches, D) float32 on CPU: every patch token entering every block, then those leaving
    the last block, for a (small) sample of images: what the token-space initialisers (sampled_tokens,
    SPT) and SHIP's attribute prototypes draw from. Under torchrun each rank passes its shard and rank 0
    receives the whole (the others get None)."""
    local, ranks = shard_of(data)
    patches = backbone.patch_embed.num_patches
    # an image's tokens are (depth + 1) x patches x D floats (7.8 MB for ViT-B/16 at 224 px): a few dozen per
    # batch keep the GPU busy, where a full batch of 256 made 6 GB of page-locked staging for 3 slots
    batch_size = max(1, min(batch_size, len(local), TOKEN_BATCH_BYTES // (4 * (len(backbone.blocks) + 1) * patches
                                                                          * backbone.embed_dim)))
    sink = HostSink({"tokens": (len(backbone.blocks) + 1, patches, backbone.embed_dim)}, len(local), batch_size,
                    device)
    for _, entering in _entering_tokens(backbone, local, batch_size, device, with_output=True):
        sink.put(tokens=torch.stack(entering, dim=1))
    tokens = gather_rows_to_writer(sink.finish()["tokens"], len(data), ranks, device)
    return None if tokens is None else tokens.transpose(0, 1).contiguous()


def sample_images(data: ImageSet, classes: range, count: int, seed: int) -> ImageSet:
    """`count` images of `classes` drawn without replacement (all of them when there are fewer), seeded."""
    pool = torch.isin(data.labels, torch.as_tensor(list(classes))).nonzero().flatten()
    generator = torch.Generator().manual_seed(seed)
    chosen = pool[torch.randperm(len(pool), generator=generator)[:count]].sort().values
    return data.take(chosen)


def class_means(values: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, ...) mean of `values` per label; a class without samples is an error."""
    counts = torch.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        raise ValueError(f"no samples for classes {(counts == 0).nonzero().flatten().tolist()}")
    sums = torch.zeros((num_classes, *values.shape[1:]), dtype=torch.float64)
    sums.index_add_(0, labels, values.double())
    return (sums / counts.view(-1, *([1] * (values.dim() - 1)))).float()


def layer_affinity(block_tokens: torch.Tensor) -> torch.Tensor:
    """(N, depth, D) per-image features entering each block -> (depth, depth) cosine affinity,
    computed per image, then averaged over images."""
    unit = F.normalize(block_tokens.double(), dim=-1)
    return (unit @ unit.transpose(1, 2)).mean(dim=0).float()
