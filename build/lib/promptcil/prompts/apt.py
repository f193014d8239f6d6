"""APT: Additive Prompt Tuning (Chen et al. 2025, arXiv 2503.07979).

One prompt shared by all tasks: for each prompted block a key vector and a value
vector (D each), ADDED to the CLS token's key and value right after the qkv
projection. No token is added, so the sequence length and timm's fused
scaled-dot-product attention are untouched and the cost stays that of the plain
forward. The vectors are split across heads the same way qkv's output is
(heads x head_dim), as in the authors' code.

The addition is done in place on the CLS row of the qkv projection's output by
a forward hook: an add on B x 2D numbers instead of rebuilding the keys and
values (measured on an H100: 0.99x vs 0.84x of the plain forward's speed).

Across tasks the prompt keeps training with a fresh optimizer; after each task
it is merged into a running average, merged = c * merged + (1 - c) * current
(the first task copies it), and inference uses the merged prompt.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from timm.models.vision_transformer import VisionTransformer

from promptcil.config.base import Section
from promptcil.prompts.base import OutputHook, PromptMethod, register_method, rescale_rms, trunc_normal_parameter


class AptConfig(Section):
    blocks: list[int] | Literal["all"] = Field(
        "all", description="Blocks whose attention gets the additive CLS key/value prompt."
    )
    merge_momentum: float = Field(
        0.7, ge=0, le=1,
        description="c in merged = c*merged + (1-c)*current after each task "
                    "(paper: 0.7 CIFAR/CUB/Cars, 0.8 ImageNet-R).",
    )
    init_std: float = Field(0.02, gt=0, description="Std of the truncated-normal initial prompt.")


@register_method("apt", config=AptConfig)
class AdditivePrompt(PromptMethod):
    supports_ensemble = True

    def __init__(
        self, backbone: VisionTransformer, blocks: list[int], merge_momentum: float = 0.7, init_std: float = 0.02
    ) -> None:
        """
        Args:
            blocks: indices of the blocks whose CLS key/value get the prompt.
            merge_momentum: c of the running average applied after each task.
            init_std: std of the initial prompt (trunc-normal, 0.02 as the authors).
        """
        super().__init__(backbone)
        depth = len(backbone.blocks)
        if not blocks or any(not 0 <= b < depth for b in blocks) or len(set(blocks)) != len(blocks):
            raise ValueError(f"method.apt.blocks: {blocks} must be distinct block indices in 0..{depth - 1}")
        self.blocks = list(blocks)
        self.merge_momentum = merge_momentum
        self.init_std = init_std
        # (prompted block, key|value, D)
        self.additive_cls_prompt = trunc_normal_parameter(len(blocks), 2, self.embed_dim, std=init_std)
        self.register_buffer("merged_prompt", torch.zeros(len(blocks), 2, self.embed_dim))
        self.register_buffer("merged_tasks", torch.zeros((), dtype=torch.int64))
        self._has_merged = False
        self.register_load_state_dict_post_hook(self._refresh_has_merged)

    @classmethod
    def from_config(cls, cfg: AptConfig, backbone: VisionTransformer) -> "AdditivePrompt":
        apt = cfg
        blocks = list(range(len(backbone.blocks))) if apt.blocks == "all" else list(apt.blocks)
        return cls(backbone, blocks, apt.merge_momentum, apt.init_std)

    def token_slots(self) -> tuple[list[int], int]:
        """One token per prompted block: its key/value projection is the block's key/value prompt."""
        return list(self.blocks), 1

    @torch.no_grad()
    def set_slot_tokens(
        self, tokens: torch.Tensor, scale: float | None = None, class_features: torch.Tensor | None = None
    ) -> None:
        """Block b's key/value prompt = the key/value projection (no bias) of its token after the block's
        norm1, i.e. the key and value that token would have inside block b, rescaled to RMS `scale`
        (None: the random init's RMS, init_std): the data gives the direction; the size stays small
        because the prompt is ADDED to the CLS token's own key and value, and a data-sized addition
        would replace them instead of adjusting them."""
        rms = scale if scale is not None else self.init_std
        dim = self.embed_dim
        for slot, index in enumerate(self.blocks):
            block = self.backbone.blocks[index]
            key_value = block.norm1(tokens[slot, 0]) @ block.attn.qkv.weight[dim:].T  # (2D,): [k | v]
            self.additive_cls_prompt[slot].copy_(rescale_rms(key_value.view(2, dim), rms))

    def active_prompt(self) -> torch.Tensor:
        """The prompt being trained while training; the merged one at inference once a task has ended."""
        if self.training or not self._has_merged:
            return self.additive_cls_prompt
        return self.merged_prompt

    def _refresh_has_merged(self, *_args) -> None:
        # A Python flag mirrors the merged_tasks buffer: reading the buffer in every block's hook would be
        # one GPU-to-host sync per block per batch (and a graph break under torch.compile).
        self._has_merged = int(self.merged_tasks) > 0

    def hooks(self) -> list[tuple[torch.nn.Module, OutputHook]]:
        return [(self.backbone.blocks[index].attn.qkv, self._make_hook(slot)) for slot, index in enumerate(self.blocks)]

    def _make_hook(self, slot: int) -> OutputHook:
        dim = self.embed_dim

        def add_to_cls_key_value(_module, _inputs, qkv_out: torch.Tensor) -> torch.Tensor:
            # qkv_out: (B, N, 3D) laid out as [q | k | v]; touch only the CLS row's k and v.
            return _AddToClsKeyValue.apply(qkv_out, self.active_prompt()[slot].reshape(-1).to(qkv_out.dtype), dim)

        return add_to_cls_key_value

    @torch.no_grad()
    def end_task(self) -> None:
        current = self.additive_cls_prompt.detach()
        if int(self.merged_tasks) == 0:
            self.merged_prompt.copy_(current)
        else:
            c = self.merge_momentum
            self.merged_prompt.mul_(c).add_(current, alpha=1 - c)
        self.merged_tasks += 1
        self._has_merged = True


class _AddToClsKeyValue(torch.autograd.Function):
    """qkv_out[:, 0, dim:] += prompt, in place, with a backward that costs a (B, 2D) sum.

    Left to autograd, an in-place add into a slice of the qkv output makes the backward clone the
    whole (B, N, 3D) gradient, zero-fill another and add them (CopySlices, SliceBackward): three
    full passes over the block's largest activation, 9.5 of the 10 ms per step by which APT's step
    trailed the fwd+bwd limit on ViT-B/16 (bench/profile_apt.py, docs/performance.md). The add is
    an identity for qkv_out's gradient and a batch sum for the prompt's, so it is written as that.
    Safe in place: nothing saved for backward holds qkv_out (the linear layer keeps its input).
    """

    @staticmethod
    def forward(ctx, qkv_out: torch.Tensor, prompt: torch.Tensor, dim: int) -> torch.Tensor:
        ctx.dim = dim
        with torch.no_grad():
            qkv_out[:, 0, dim:] += prompt
        return qkv_out.view_as(qkv_out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        return grad, grad[:, 0, ctx.dim:].sum(dim=0), None
