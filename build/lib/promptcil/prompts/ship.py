"""SHIP: Semantic Hierarchical Prompt tuning (Zhu et al., ICASSP 2025, arXiv 2412.16956).

The blocks are grouped into semantic levels from the data (`semantic_levels`:
walking from block 0, a block whose feature affinity to the current level's
first block, its anchor, falls below a threshold starts the next level). Prompt
tokens are appended after the image tokens:
- Semantic Independent Prompts (SIP): fresh tokens at each anchor, one set per
  level; inside a level they are carried from block to block (the blocks of a
  level add no prompt parameters of their own).
- Semantic Shared Prompts (SSP): one set of tokens, inserted afresh at every block.
- Attribute Prompts (AP): at the last `attribute_layers` anchors, tokens that each
  take a small weight of the k-means prototype (of final-layer tokens) nearest to
  one of the image tokens the CLS token attended to most in the previous block.
- Decoupled attention: image tokens attend to image tokens with the backbone's
  own softmax, and to the prompts with a separate softmax, mixed as
  (1 - s) * image + s * prompt; prompts pass through attention unchanged except in
  the last block, where they attend to everything (as in the authors' code).
- Prompt-matching loss: 1 - the best cosine similarity of each prompt token leaving
  the last block to the image tokens most attended by CLS, averaged.

The grouping and the prototype bank come from the data (`fit_to_data`, run by the
prompt_init stage on the features stage's statistics) and are part of the state,
so any SHIP instance loads any saved SHIP state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from promptcil.config.base import Section
from promptcil.prompts.base import PromptMethod, register_method, rescale_rms, trunc_normal_parameter


def semantic_levels(affinity: torch.Tensor, threshold: float) -> list[int]:
    """Anchor blocks of contiguous semantic levels: block l joins the current level while its affinity
    to the level's anchor is at least `threshold`, else it becomes the next anchor."""
    anchors = [0]
    for layer in range(1, affinity.shape[0]):
        if float(affinity[anchors[-1], layer]) < threshold:
            anchors.append(layer)
    return anchors


class ShipConfig(Section):
    sip_length: int = Field(10, gt=0, description="Semantic Independent Prompt tokens per semantic level.")
    ssp_length: int = Field(10, ge=0, description="Semantic Shared Prompt tokens, inserted at every block (0: off).")
    attribute_layers: int = Field(
        2, ge=0, description="The last anchors (levels) that also get Attribute Prompts (0: off)."
    )
    attribute_length: int = Field(10, gt=0, description="Attribute Prompt tokens per attribute layer.")
    attribute_prototypes: int = Field(
        200, gt=0, description="K: k-means prototypes of the final layer's tokens (task 0's token sample)."
    )
    attribute_weight: float = Field(
        0.1, ge=0, le=1, description="Weight of the matched prototype in an attribute token."
    )
    affinity_threshold: float = Field(
        0.9, gt=-1, le=1,
        description="A block whose mean cosine affinity to the current level's anchor is below this starts a "
        "new level (1: one level per block).",
    )
    decoupled_attention: bool = Field(
        True, description="Image tokens keep their own softmax; prompts enter through a separate one."
    )
    decoupled_scale: float = Field(0.1, ge=0, le=1, description="s: image_out = (1-s)*image + s*prompt attention.")
    matching_loss_weight: float = Field(0.5, ge=0, description="Weight of the prompt-matching loss (0: off).")
    matching_top_k: int = Field(10, gt=0, description="Image tokens most attended by CLS that prompts match.")
    init_std: float = Field(0.02, gt=0, description="Std of the truncated-normal initial prompt.")


@register_method("ship", config=ShipConfig)
class SemanticHierarchicalPrompt(PromptMethod):
    def __init__(self, backbone: VisionTransformer, cfg: ShipConfig, anchors: list[int] | None = None) -> None:
        """
        Args:
            cfg: method.ship from params.yaml.
            anchors: first block of each semantic level (default: one level per block until
                `fit_to_data` or a loaded state sets the grouping).
        """
        super().__init__(backbone)
        self.cfg = cfg
        self.init_std = cfg.init_std
        dim = self.embed_dim
        anchors = list(range(self.depth)) if anchors is None else anchors
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.int64))
        self.semantic_independent = trunc_normal_parameter(len(anchors), cfg.sip_length, dim, std=cfg.init_std)
        self.semantic_shared = trunc_normal_parameter(cfg.ssp_length, dim, std=cfg.init_std)
        self.attribute = trunc_normal_parameter(cfg.attribute_layers, cfg.attribute_length, dim, std=cfg.init_std)
        self.register_buffer("attribute_bank", torch.zeros(cfg.attribute_prototypes, dim))
        self._refresh_anchors()
        self.register_load_state_dict_post_hook(lambda module, _keys: module._refresh_anchors())

    @classmethod
    def from_config(cls, cfg: ShipConfig, backbone: VisionTransformer) -> "SemanticHierarchicalPrompt":
        return cls(backbone, cfg)

    # ---- structure ---------------------------------------------------------------
    def _refresh_anchors(self) -> None:
        # Python copies of the grouping: reading the buffer in the forward would sync the GPU per block.
        self._anchor_list = [int(a) for a in self.anchors]
        attribute_count = min(self.cfg.attribute_layers, len(self._anchor_list))
        self._attribute_anchors = self._anchor_list[len(self._anchor_list) - attribute_count:]

    def set_levels(self, anchors: list[int]) -> None:
        """Regroup the blocks; the SIP tensor gets one (freshly drawn) set of tokens per level."""
        if not anchors or anchors[0] != 0 or sorted(set(anchors)) != anchors or anchors[-1] >= self.depth:
            raise ValueError(f"SHIP levels: anchors {anchors} must start at 0, increase and stay below {self.depth}")
        self.anchors = torch.tensor(anchors, dtype=torch.int64, device=self.anchors.device)
        self.semantic_independent = trunc_normal_parameter(
            len(anchors), self.cfg.sip_length, self.embed_dim, std=self.cfg.init_std
        ).to(self.anchors.device)
        self._refresh_anchors()

    @torch.no_grad()
    def fit_to_data(self, stats: dict[str, torch.Tensor], seed: int) -> dict:
        """The data-derived parts: the semantic levels from the layer affinity of task 0's images, and
        the attribute prototypes (k-means of final-layer tokens). Returns what to record."""
        from promptcil.init.tokens import kmeans_centres

        self.set_levels(semantic_levels(stats["layer_affinity"], self.cfg.affinity_threshold))
        if self.cfg.attribute_layers:
            final_tokens = stats["block_token_sample"][-1].flatten(0, 1)  # the last block's output tokens
            self.attribute_bank.copy_(kmeans_centres(final_tokens, self.cfg.attribute_prototypes, seed))
        return {"anchors": self._anchor_list, "levels": self.levels(), "threshold": self.cfg.affinity_threshold}

    def levels(self) -> list[list[int]]:
        bounds = [*self._anchor_list, self.depth]
        return [list(range(bounds[i], bounds[i + 1])) for i in range(len(self._anchor_list))]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A saved state fixes the grouping and the prompt sizes: take its shapes before loading.
        for name in ("semantic_independent", "semantic_shared", "attribute"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, nn.Parameter(torch.empty(saved.shape, device=self.anchors.device)))
        for name in ("anchors", "attribute_bank"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty(saved.shape, dtype=saved.dtype, device=self.anchors.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- initialisers ------------------------------------------------------------
    def token_slots(self) -> tuple[list[int], int]:
        """The SIP tokens of each level stand for the tokens entering its anchor block."""
        return list(self._anchor_list), self.cfg.sip_length

    @torch.no_grad()
    def set_slot_tokens(
        self, tokens: torch.Tensor, scale: float | None = None, class_features: torch.Tensor | None = None
    ) -> None:
        self.semantic_independent.copy_(tokens if scale is None else rescale_rms(tokens, scale))

    # ---- forward -----------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        batch, image_tokens = x.shape[0], x.shape[1]
        cfg = self.cfg
        last = self.depth - 1
        need_attention = ({a - 1 for a in self._attribute_anchors if a > 0}
                          | ({last} if cfg.matching_loss_weight else set()))
        cls_attention: torch.Tensor | None = None
        level = -1
        self.aux_loss = None
        for index, block in enumerate(self.backbone.blocks):
            if index in self._anchor_list:
                level += 1
                carried = self.semantic_independent[level].to(x.dtype).expand(batch, -1, -1)
                if index in self._attribute_anchors and cls_attention is not None:
                    slot = self._attribute_anchors.index(index)
                    carried = torch.cat([carried, self._attribute_tokens(x[:, :image_tokens], cls_attention, slot)], 1)
            else:  # inside a level: the level's prompts leave the previous block and go on
                carried = x[:, image_tokens : x.shape[1] - cfg.ssp_length]
            shared = self.semantic_shared.to(x.dtype).expand(batch, -1, -1)
            x = torch.cat([x[:, :image_tokens], carried, shared], dim=1)
            x, cls_attention = self._block(block, x, image_tokens, last=index == last,
                                            want_cls_attention=index in need_attention)
        if cfg.matching_loss_weight and cls_attention is not None and x.shape[1] > image_tokens:
            self.aux_loss = cfg.matching_loss_weight * self._matching_loss(x, image_tokens, cls_attention)
        x = self.backbone.norm(x[:, :image_tokens])
        return self.backbone.forward_head(x, pre_logits=True)

    def _block(
        self, block: Block, x: torch.Tensor, image_tokens: int, *, last: bool, want_cls_attention: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One ViT block with the prompts appended after `image_tokens` image tokens (decoupled
        attention unless switched off); also the CLS token's attention over the image tokens."""
        attn = block.attn
        h = block.norm1(x)
        b, t, d = h.shape
        qkv = attn.qkv(h).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if self.cfg.decoupled_attention and t > image_tokens:
            s = self.cfg.decoupled_scale
            qi, n = q[:, :, :image_tokens], image_tokens
            image_out = F.scaled_dot_product_attention(qi, k[:, :, :n], v[:, :, :n])
            prompt_in = F.scaled_dot_product_attention(qi, k[:, :, n:], v[:, :, n:])
            if last:
                prompt_out = F.scaled_dot_product_attention(q[:, :, n:], k, v)
            else:  # prompts pass through attention unchanged
                prompt_out = h[:, n:].reshape(b, t - n, attn.num_heads, attn.head_dim).transpose(1, 2)
            out = torch.cat([(1 - s) * image_out + s * prompt_in, prompt_out], dim=2)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = attn.proj(attn.norm(out.transpose(1, 2).reshape(b, t, d)))
        x = x + block.drop_path1(block.ls1(out))
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        cls_attention = None
        if want_cls_attention:
            scores = (q[:, :, :1] @ k[:, :, :image_tokens].transpose(-2, -1)).float() * attn.scale
            cls_attention = scores.softmax(dim=-1).mean(dim=1).squeeze(1)  # (B, image tokens), heads averaged
        return x, cls_attention

    def _most_attended(self, tokens: torch.Tensor, cls_attention: torch.Tensor, count: int) -> torch.Tensor:
        """(B, count, D): the patch tokens the CLS token attended to most (CLS itself excluded)."""
        top = cls_attention[:, 1:].topk(min(count, tokens.shape[1] - 1), dim=-1).indices + 1
        return torch.gather(tokens, 1, top.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))

    def _attribute_tokens(self, tokens: torch.Tensor, cls_attention: torch.Tensor, slot: int) -> torch.Tensor:
        attended = self._most_attended(tokens, cls_attention, self.cfg.attribute_length)  # (B, <=L, D)
        bank = self.attribute_bank.to(tokens.dtype)
        nearest = (F.normalize(attended, dim=-1) @ F.normalize(bank, dim=-1).T).argmax(dim=-1)
        pattern = bank[nearest]  # (B, <=L, D)
        prompt = self.attribute[slot, : pattern.shape[1]].to(tokens.dtype)
        w = self.cfg.attribute_weight
        return (1 - w) * prompt + w * pattern

    def _matching_loss(self, x: torch.Tensor, image_tokens: int, cls_attention: torch.Tensor) -> torch.Tensor:
        attended = self._most_attended(x[:, :image_tokens], cls_attention, self.cfg.matching_top_k)
        prompts = x[:, image_tokens:]
        similarity = F.normalize(prompts.float(), dim=-1) @ F.normalize(attended.float(), dim=-1).transpose(1, 2)
        return (1 - similarity.max(dim=-1).values).mean()
