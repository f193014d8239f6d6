"""The small interface every prompt method implements.

A method owns only its prompt tensors. It is attached to a frozen timm ViT and
runs the backbone's own modules in the backbone's own order, so the prompted
forward is still "tokens -> blocks -> norm -> CLS pooling"; a method changes
the token sequence between blocks (`before_block`) or installs hooks inside a
block (`attach`). The backbone is deliberately NOT a registered submodule: the
method's `parameters()` and `state_dict()` are the prompt alone, which is what
is trained, checkpointed and versioned.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.hooks import RemovableHandle

from promptcil.backbone import embed_tokens
from promptcil.registry import Registry

OutputHook = Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]
_OWNER = "_promptcil_prompt_method"  # backbone attribute: weak reference to the attached method

METHODS: Registry[type["PromptMethod"]] = Registry("prompt method", "promptcil.prompts")


def register_method(name: str, config: type[BaseModel] | None = None):
    """Class decorator: make a method selectable as `method.name` in params.yaml, with its settings
    `config` as `method.<name>`."""

    def wrap(cls: type[PromptMethod]) -> type[PromptMethod]:
        cls.method_name = name
        return METHODS.register(name, config)(cls)

    return wrap


def create_method(cfg: Any, backbone: VisionTransformer) -> "PromptMethod":
    """The method params' `method` section names, built from its own settings (`method.<name>`)."""
    return METHODS[cfg.name].obj.from_config(METHODS.settings(cfg.name, cfg), backbone)


class PromptMethod(nn.Module):
    method_name: ClassVar[str] = ""
    supports_ensemble: ClassVar[bool] = False
    """Whether `method.ensemble` > 1 may batch several of it (prompts/ensemble.py)."""
    init_std: float = 0.02
    """Std of the method's random init (method.<name>.init_std); the random initialiser's default scale."""

    def __init__(self, backbone: VisionTransformer) -> None:
        super().__init__()
        self.__dict__["backbone"] = backbone  # shared, frozen, not part of this module's state
        self.aux_loss: torch.Tensor | None = None
        self._handles: list[RemovableHandle] = []

    @classmethod
    def from_config(cls, cfg: Any, backbone: VisionTransformer) -> "PromptMethod":
        """Build from the method's own settings (`method.<name>`; None for a method without any)."""
        raise NotImplementedError

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    @property
    def depth(self) -> int:
        return len(self.backbone.blocks)

    def attach(self) -> None:
        """Claim the backbone: install this method's hooks, removing those of any other method.

        Several models may share one frozen backbone (evaluation, retraining), but a
        backbone carries one method's hooks at a time; a model whose method lost the
        backbone refuses to run instead of silently mixing two prompts.
        """
        owner = self.backbone.__dict__.get(_OWNER)
        if owner is not None and owner() is not None and owner() is not self:
            owner().detach()
        self._install_hooks()
        self.backbone.__dict__[_OWNER] = weakref.ref(self)

    def detach(self) -> None:
        """Remove this method's hooks, leaving the backbone exactly as it was."""
        self._remove_hooks()
        owner = self.backbone.__dict__.get(_OWNER)
        if owner is not None and owner() is self:
            del self.backbone.__dict__[_OWNER]

    @property
    def attached(self) -> bool:
        owner = self.backbone.__dict__.get(_OWNER)
        return owner is not None and owner() is self

    def hooks(self) -> list[tuple[nn.Module, OutputHook]]:
        """(backbone module, forward hook) pairs: each hook edits that module's output IN PLACE and returns
        it, so it also works on a slice of the batch (an ensemble member's rows). Default: none."""
        return []

    def _install_hooks(self) -> None:
        self._remove_hooks()
        for module, hook in self.hooks():
            self._handles.append(module.register_forward_hook(hook))

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __call__(self, *args, **kwargs):
        if not self.attached:
            raise RuntimeError(
                f"{self.method_name}: the backbone is attached to another method; call attach() before using this one"
            )
        return super().__call__(*args, **kwargs)

    def end_task(self) -> None:
        """Called once after each task's training (e.g. APT merges its prompt)."""

    def token_slots(self) -> tuple[list[int], int]:
        """Where the prompt lives in token space, for the token initialisers: the blocks whose
        ENTERING tokens its slots stand for, and how many slots each of them has. Default: none."""
        return [], 0

    def set_slot_tokens(
        self, tokens: torch.Tensor, scale: float | None = None, class_features: torch.Tensor | None = None
    ) -> None:
        """Set the prompt from tokens shaped (len(blocks), slots, D) as `token_slots` describes.

        Args:
            scale: RMS to give the prompt; None: the method's choice (see each method).
            class_features: (C, D) task 0's class-mean CLS features, for methods that also have keys.
        """

    def fit_to_data(self, stats: dict[str, torch.Tensor], seed: int) -> dict:
        """Set whatever the method derives from task 0's data statistics before any training (SHIP: its
        semantic levels and attribute prototypes); returns JSON-able facts to record. Default: nothing."""
        return {}

    def prompt_parameters(self) -> list[nn.Parameter]:
        """The prompt tensors a random initialiser redraws (default: every parameter)."""
        return list(self.parameters())

    def before_block(self, index: int, tokens: torch.Tensor) -> torch.Tensor:
        """Edit the token sequence entering block `index`. Default: unchanged."""
        return tokens

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding + CLS + positions, exactly as timm's forward_features starts."""
        return embed_tokens(self.backbone, images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Prompted CLS features (B, D) of normalised images; sets `aux_loss` if the method has one."""
        tokens = self.embed(images)
        for index, block in enumerate(self.backbone.blocks):
            tokens = block(self.before_block(index, tokens))
        tokens = self.backbone.norm(tokens)
        return self.backbone.forward_head(tokens, pre_logits=True)


def rescale_rms(tokens: torch.Tensor, rms: float) -> torch.Tensor:
    """`tokens` scaled so that each leading-index slice has root-mean-square `rms`."""
    current = tokens.pow(2).flatten(1).mean(dim=1).sqrt().clamp_min(1e-12)
    return tokens * (rms / current).view(-1, *([1] * (tokens.dim() - 1)))


def cycle_rows(rows: torch.Tensor, count: int) -> torch.Tensor:
    """`count` rows taken from `rows` in turn (one prototype per slot, cycling when slots outnumber classes)."""
    return rows[torch.arange(count) % rows.shape[0]]


def trunc_normal_parameter(*shape: int, std: float) -> nn.Parameter:
    """timm/VPT's usual prompt init: truncated normal, cut at +-2 absolute (in effect a plain normal)."""
    return nn.Parameter(nn.init.trunc_normal_(torch.empty(*shape), std=std))
