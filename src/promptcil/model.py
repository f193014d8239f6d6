"""The incremental classifier: frozen backbone + prompt method + head.

uint8 images go in (normalised on whatever device the model is on), logits over
all classes seen so far come out. Its trainable state (prompt + head) is all
that a task changes, so it is what checkpoints and registry versions hold; the
backbone is referenced by its weights' fingerprint, never copied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from promptcil.artifacts import ArtifactKind, load_tensors
from promptcil.backbone import load_recorded_backbone
from promptcil.config.schema import Params
from promptcil.data import DevicePreprocess
from promptcil.heads import Head, create_head
from promptcil.heads.ensemble import EnsembleHead
from promptcil.prompts import PromptMethod, create_method
from promptcil.prompts.ensemble import PromptEnsemble


class IncrementalModel(nn.Module):
    def __init__(self, backbone: VisionTransformer, method: PromptMethod, head: Head) -> None:
        super().__init__()
        self.__dict__["backbone"] = backbone  # frozen and shared; not in this module's state
        self.preprocess = DevicePreprocess.from_model(backbone)
        self.method = method
        self.head = head
        method.attach()

    @classmethod
    def from_params(cls, params: Params, backbone: VisionTransformer) -> "IncrementalModel":
        """params' method and head; with method.ensemble = K > 1, K of each (prompts drawn one after another
        from the current random state, so each member starts from its own random init)."""
        k = params.method.ensemble
        if k == 1:
            return cls(backbone, create_method(params.method, backbone), create_head(params.head, backbone.embed_dim))
        method = PromptEnsemble([create_method(params.method, backbone) for _ in range(k)])
        head = EnsembleHead([create_head(params.head, backbone.embed_dim) for _ in range(k)])
        return cls(backbone, method, head)

    def to(self, *args, **kwargs) -> "IncrementalModel":  # type: ignore[override]
        self.backbone.to(*args, **kwargs)
        return super().to(*args, **kwargs)

    def train(self, mode: bool = True) -> "IncrementalModel":  # type: ignore[override]
        """Only the prompt and head switch modes: the backbone stays in eval (no dropout, fixed function)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def features(self, images_uint8: torch.Tensor) -> torch.Tensor:
        images = self.preprocess(images_uint8)
        # compiled (train.compile): one graph for every batch size, not one for the first and another when a
        # task's last, smaller batch comes (a no-op in eager mode)
        torch._dynamo.maybe_mark_dynamic(images, 0)
        return self.method(images)

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images_uint8))

    def param_groups(self) -> list[dict[str, Any]]:
        """What the trainer optimises: the prompt at train.lr, then the head's own groups (a head may scale
        its learning rate, e.g. DePT's CAT head); empty groups are left out."""
        groups = [{"params": [p for p in self.method.parameters() if p.requires_grad]}]
        if self.head.trainable:
            groups += self.head.param_groups()
        return [group for group in groups if group["params"]]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for group in self.param_groups() for p in group["params"]]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Prompt + head tensors (parameters and buffers) under 'method.' / 'head.' prefixes."""
        state = {f"method.{k}": v for k, v in self.method.state_dict().items()}
        state |= {f"head.{k}": v for k, v in self.head.state_dict().items()}
        return {k: v.detach().clone() for k, v in state.items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        method_state = {k.removeprefix("method."): v for k, v in state.items() if k.startswith("method.")}
        head_state = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
        self.method.load_state_dict(method_state)
        self.head.load_grown_state(head_state)

    @torch.no_grad()
    def predict(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """Incremental labels (argmax over all seen classes)."""
        return self.forward(images_uint8).argmax(dim=1)


def build_model(params: Params, backbone_dir: Path, *, prompt_init: Path | None = None,
                device: torch.device | None = None) -> IncrementalModel:
    """The model a pipeline run trains and evaluates: params' method and head on the backbone recorded in
    `backbone_dir` (the pretrain stage's output, or a registry version's copy). The prompt starts from the
    prompt_init artifact when given, else from the seeded random init of `train.seed`."""
    backbone = load_recorded_backbone(params.backbone, backbone_dir, seed=params.train.seed)
    torch.manual_seed(params.train.seed)
    model = IncrementalModel.from_params(params, backbone)
    if prompt_init is not None:
        prompt, _ = load_tensors(prompt_init, kind=ArtifactKind.PROMPT_INIT)
        model.method.load_state_dict(prompt)
    return model.to(device) if device is not None else model
