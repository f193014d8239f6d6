"""L2P-style prompt pool (Wang et al. 2022): the cost baseline APT is measured against.

A pool of prompts, each with a learnable key. A query is computed by a full
un-prompted forward pass of the frozen backbone (CLS features); the top-k
prompts whose keys are closest (cosine) to the query are prepended after the
CLS token at the input. The matching loss pulls the chosen keys towards their
queries. The extra query pass is why its inference costs about twice the plain
forward. Simplification: the classifier reads the CLS token (L2P averages the
prompt tokens' outputs); this baseline need not reach the paper's accuracy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from timm.models.vision_transformer import VisionTransformer

from promptcil.config.base import Section
from promptcil.prompts.base import PromptMethod, cycle_rows, register_method, rescale_rms, trunc_normal_parameter


class L2PConfig(Section):
    pool_size: int = Field(10, gt=0, description="Prompts in the pool.")
    length: int = Field(5, gt=0, description="Tokens per prompt.")
    top_k: int = Field(5, gt=0, description="Prompts chosen per image by key matching.")
    key_loss_weight: float = Field(0.1, ge=0, description="Weight of the query-key matching loss.")
    init_std: float = Field(0.02, gt=0, description="Std of the truncated-normal initial prompt.")

    @model_validator(mode="after")
    def _check(self) -> "L2PConfig":
        if self.top_k > self.pool_size:
            raise ValueError(f"top_k {self.top_k} exceeds pool_size {self.pool_size}")
        return self


@register_method("l2p", config=L2PConfig)
class PromptPool(PromptMethod):
    def __init__(
        self,
        backbone: VisionTransformer,
        pool_size: int = 10,
        length: int = 5,
        top_k: int = 5,
        key_loss_weight: float = 0.1,
        init_std: float = 0.02,
    ) -> None:
        super().__init__(backbone)
        if top_k > pool_size:
            raise ValueError(f"method.l2p.top_k: {top_k} exceeds pool_size {pool_size}")
        self.top_k = top_k
        self.key_loss_weight = key_loss_weight
        self.init_std = init_std
        self.prompt_pool = trunc_normal_parameter(pool_size, length, self.embed_dim, std=init_std)
        self.prompt_keys = uniform_keys(pool_size, self.embed_dim)

    @classmethod
    def from_config(cls, cfg: L2PConfig, backbone: VisionTransformer) -> "PromptPool":
        c = cfg
        return cls(backbone, c.pool_size, c.length, c.top_k, c.key_loss_weight, c.init_std)

    def token_slots(self) -> tuple[list[int], int]:
        """Every pool token is prepended to the sequence entering block 0."""
        pool, length, _ = self.prompt_pool.shape
        return [0], pool * length

    @torch.no_grad()
    def set_slot_tokens(
        self, tokens: torch.Tensor, scale: float | None = None, class_features: torch.Tensor | None = None
    ) -> None:
        """Pool tokens from `tokens` (RMS `scale`, None keeps theirs); with class features, key p = class
        (p mod C)'s CLS feature, so each class's images start by choosing 'their' prompts."""
        pool, length, dim = self.prompt_pool.shape
        tokens = tokens[0] if scale is None else rescale_rms(tokens, scale)[0]
        self.prompt_pool.copy_(tokens.view(pool, length, dim))
        if class_features is not None:
            self.prompt_keys.copy_(cycle_rows(class_features, pool))

    def prompt_parameters(self) -> list[torch.nn.Parameter]:
        """The keys keep L2P's uniform init; only the pool's tokens are prompt."""
        return [self.prompt_pool]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            query = self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True)
        similarity = F.normalize(query.float(), dim=-1) @ F.normalize(self.prompt_keys, dim=-1).T  # (B, pool)
        chosen_sim, chosen = similarity.topk(self.top_k, dim=-1)
        # L2P's surrogate loss: maximise the query-key similarity of the chosen prompts
        self.aux_loss = self.key_loss_weight * (1 - chosen_sim).sum(dim=1).mean()
        tokens = self.embed(images)
        prompts = self.prompt_pool[chosen].flatten(1, 2).to(tokens.dtype)  # (B, k*length, D)
        tokens = torch.cat([tokens[:, :1], prompts, tokens[:, 1:]], dim=1)
        tokens = self.backbone.norm(self.backbone.blocks(tokens))
        return self.backbone.forward_head(tokens, pre_logits=True)


def uniform_keys(pool_size: int, dim: int) -> torch.nn.Parameter:
    """Keys uniform in [-1, 1] as in L2P's reference implementation."""
    return torch.nn.Parameter(torch.empty(pool_size, dim).uniform_(-1, 1))
