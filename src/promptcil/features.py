"""Frozen-backbone statistics computed once per pipeline run (the `features` stage).

For every training image: the final CLS feature (what prototype heads and
SimpleCIL use) and, for every block, the mean patch token ENTERING that block
(what token-space initialisers need). Per-class means of both are the
prototypes.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from promptcil.backbone import embed_tokens
from promptcil.data import DevicePreprocess, ImageSet, make_loader
from promptcil.runtime import autocast_for


@torch.no_grad()
def backbone_statistics(
    backbone: VisionTransformer, data: ImageSet, batch_size: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """{"cls": (N, D), "block_input_tokens": (N, depth, D), "labels": (N,)} in data order, float32 on CPU."""
    backbone.eval().to(device)
    preprocess = DevicePreprocess.from_model(backbone).to(device)
    cls_out, block_out = [], []
    prefix = backbone.num_prefix_tokens
    for images, _ in make_loader(data, batch_size, shuffle=False, seed=0, pin_memory=device.type == "cuda"):
        with autocast_for(device):
            tokens = embed_tokens(backbone, preprocess(images.to(device, non_blocking=True)))
            entering = []
            for block in backbone.blocks:
                entering.append(tokens[:, prefix:].mean(dim=1))
                tokens = block(tokens)
            cls = backbone.forward_head(backbone.norm(tokens), pre_logits=True)
        cls_out.append(cls.float().cpu())
        block_out.append(torch.stack(entering, dim=1).float().cpu())
    return {"cls": torch.cat(cls_out), "block_input_tokens": torch.cat(block_out), "labels": data.labels.clone()}


def class_means(values: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, ...) mean of `values` per label; a class without samples is an error."""
    counts = torch.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        raise ValueError(f"no samples for classes {(counts == 0).nonzero().flatten().tolist()}")
    sums = torch.zeros((num_classes, *values.shape[1:]), dtype=torch.float64)
    sums.index_add_(0, labels, values.double())
    return (sums / counts.view(-1, *([1] * (values.dim() - 1)))).float()
