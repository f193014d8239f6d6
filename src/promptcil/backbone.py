"""The frozen Vision Transformer every method prompts.

Weights come through timm's own loading path (`pretrained=True`, with
`pretrained_cfg_overlay=dict(file=...)` for a local copy of hub weights), a
user-supplied weights file, or the pipeline's own pretraining on the base
classes (see `promptcil.pretrain`). Whatever the source, the returned model has
no classifier (`num_classes=0`), pools the CLS token, and is frozen.
"""

from __future__ import annotations

import hashlib
from itertools import chain
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from promptcil.artifacts import ArtifactKind, load_tensors, load_weights_file
from promptcil.config.sections import BackboneConfig
from promptcil.errors import BackboneError

WEIGHTS_FILE = "weights.safetensors"  # inside a backbone folder: the pretrain stage's output


def model_kwargs(cfg: BackboneConfig, num_classes: int = 0) -> dict[str, Any]:
    """timm constructor overrides from params; unset fields keep timm's defaults."""
    kwargs: dict[str, Any] = dict(
        img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=num_classes, global_pool="token"
    )
    for key in ("embed_dim", "depth", "num_heads"):
        value = getattr(cfg, key)
        if value is not None:
            kwargs[key] = value
    return kwargs


def create_vit(cfg: BackboneConfig, num_classes: int = 0, *, pretrained: bool = False) -> VisionTransformer:
    """Build the timm ViT named in params (random init unless `pretrained`)."""
    if cfg.name not in timm.list_models():
        raise BackboneError(f"backbone.name: '{cfg.name}' is not a timm model")
    overlay = {"file": str(cfg.file)} if pretrained and cfg.file is not None else None
    try:
        model = timm.create_model(
            cfg.name, pretrained=pretrained, pretrained_cfg_overlay=overlay, **model_kwargs(cfg, num_classes)
        )
    except (RuntimeError, ValueError, OSError) as err:
        raise BackboneError(f"backbone.name: cannot create '{cfg.name}': {str(err).splitlines()[0]}") from None
    if not isinstance(model, VisionTransformer) or model.cls_token is None:
        raise BackboneError(
            f"backbone.name: '{cfg.name}' is not a timm VisionTransformer with a CLS token; "
            "prompt methods act on the CLS token's attention"
        )
    return model


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """No parameter takes gradients and dropout/drop-path are off: the backbone is a fixed function."""
    model.requires_grad_(False)
    return model.eval()


def load_state(model: VisionTransformer, state: dict[str, torch.Tensor], origin: str, *, assign: bool = False) -> None:
    """Load backbone weights, tolerating only classifier keys (heads are promptcil's own); `assign`: the model
    takes the tensors themselves (a model built on the meta device)."""
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    result = model.load_state_dict(state, strict=False, assign=assign)
    missing = [k for k in result.missing_keys if not k.startswith("head.")]
    if missing or result.unexpected_keys:
        bad = (missing + list(result.unexpected_keys))[:3]
        raise BackboneError(
            f"{origin}: weights do not fit backbone.name/img_size/patch_size (mismatched keys, e.g. {bad})"
        )


def vit_with_weights(cfg: BackboneConfig, state: dict[str, torch.Tensor], origin: str) -> VisionTransformer:
    """The ViT of `cfg` holding `state`: built on the meta device and handed the loaded tensors, without the
    random initialisation they would replace (0.9 s for ViT-B/16 on a CPU core, in every stage that loads the
    backbone). A tensor the weights do not hold (a buffer made at construction) means building it for real."""
    with torch.device("meta"):
        model = create_vit(cfg)
    expected = dict(chain(model.named_parameters(), model.named_buffers()))
    # assigned tensors keep their dtype: cast as load_state_dict's copy would (a float16 file, a float32 model)
    state = {k: v.to(expected[k].dtype) if k in expected and v.dtype != expected[k].dtype else v
             for k, v in state.items()}
    load_state(model, state, origin, assign=True)
    if any(t.is_meta for t in chain(model.parameters(), model.buffers())):
        model = create_vit(cfg)
        load_state(model, state, origin)
    return model


def load_backbone(cfg: BackboneConfig, weights: Path | None = None, seed: int = 0) -> VisionTransformer:
    """The frozen backbone for `cfg.source`.

    `weights` is the pipeline-pretrained artifact and is required for
    `source: pretrain`; the other sources ignore it.
    """
    if cfg.source == "hub":
        model = create_vit(cfg, pretrained=True)
    elif cfg.source == "file":
        assert cfg.file is not None  # enforced by the config schema
        weights = load_weights_file(cfg.file)  # ArtifactError for pickles with code, unreadable files
        try:
            model = vit_with_weights(cfg, weights, "backbone.file")
        except RuntimeError as err:  # shape mismatch inside load_state_dict
            raise BackboneError(f"backbone.file: {str(err).splitlines()[0]}") from None
    elif cfg.source == "pretrain":
        if weights is None:
            raise BackboneError(
                "backbone.source 'pretrain' needs the pretrain stage's weights (run the pretrain stage)")
        tensors, _ = load_tensors(weights, kind=ArtifactKind.BACKBONE)
        model = vit_with_weights(cfg, tensors, str(weights))
    else:  # random: for tests and speed benchmarks only
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = create_vit(cfg)
    return freeze(model)


def load_recorded_backbone(cfg: BackboneConfig, folder: Path, seed: int = 0) -> VisionTransformer:
    """The backbone a pipeline run recorded in `folder` (the pretrain stage's output, or its copy in a
    registry version): the weights trained there when it holds them, else the source named in `cfg`."""
    weights = folder / WEIGHTS_FILE
    return load_backbone(cfg, weights=weights if weights.is_file() else None, seed=seed)


def embed_tokens(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Patch embedding + CLS + positions: the tokens entering block 0, as timm's forward_features starts."""
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the backbone's tensors, so a run records exactly which weights it prompted."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


__all__ = [
    "WEIGHTS_FILE",
    "BackboneError",
    "create_vit",
    "embed_tokens",
    "freeze",
    "load_backbone",
    "load_recorded_backbone",
    "load_state",
    "vit_with_weights",
    "model_kwargs",
    "weights_fingerprint",
]
