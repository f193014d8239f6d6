"""SPT's token prototypes (Wang et al., ICML 2024): prompt slots from the tokens entering each block."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from promptcil.config.base import Section
from promptcil.init.base import register_initialiser
from promptcil.init.tokens import draw_rows, kmeans_centres, window_means
from promptcil.prompts import PromptMethod


class SptConfig(Section):
    mode: Literal["kmeans", "mean_pooling", "sample"] = Field(
        "kmeans",
        description="How the prompt slots of block i are drawn from the tokens entering block i: kmeans: "
        "k-means centres (SPT's token prototypes; scikit-learn); mean_pooling: means of windows of "
        "`window` consecutive tokens of one image, then a sample of those (the cheap variant); sample: "
        "a sample of the tokens themselves.",
    )
    window: int = Field(4, gt=0, description="mean_pooling: tokens averaged per window.")


@register_initialiser("spt", config=SptConfig)
@torch.no_grad()
def spt_init(method: PromptMethod, stats: dict[str, torch.Tensor], cfg: Any, seed: int) -> None:
    """SPT (Wang et al., ICML 2024): block b's slots from the tokens ENTERING block b of task 0's
    images (block 0: the patch embeddings), as k-means centres, window means or a plain sample."""
    blocks, slots = method.token_slots()
    generator = torch.Generator().manual_seed(seed)
    per_block = []
    for b in blocks:
        tokens = stats["block_token_sample"][b]  # (images, patches, D)
        if cfg.spt.mode == "kmeans":
            per_block.append(kmeans_centres(tokens.flatten(0, 1), slots, seed))
        elif cfg.spt.mode == "mean_pooling":
            per_block.append(draw_rows(window_means(tokens, cfg.spt.window), slots, generator))
        else:
            per_block.append(draw_rows(tokens.flatten(0, 1), slots, generator))
    method.set_slot_tokens(torch.stack(per_block), cfg.scale)
