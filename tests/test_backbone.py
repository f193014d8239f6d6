"""Backbone loading through timm's own paths, on locally saved weights (no network here)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from promptcil.artifacts import ArtifactError
from promptcil.backbone import BackboneError, create_vit, load_backbone
from promptcil.config import BackboneConfig

from conftest import TINY_BACKBONE


@pytest.fixture(scope="module")
def source_weights():
    """A ViT with its own (random, seeded) weights and a 7-class head, as a user's checkpoint would be."""
    torch.manual_seed(3)
    model = create_vit(BackboneConfig(**TINY_BACKBONE), num_classes=7)
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_loaded(model, weights) -> None:
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items() if not k.startswith("head."))
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert isinstance(model.head, torch.nn.Identity)


def test_hub_source_loads_through_timms_pretrained_path_from_a_local_file(source_weights, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(source_weights, path)
    model = load_backbone(BackboneConfig(source="hub", file=path, **TINY_BACKBONE))
    assert_loaded(model, source_weights)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_file_source_loads_safetensors_and_weights_only_checkpoints(source_weights, tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(source_weights, path)
    else:
        torch.save({"state_dict": source_weights}, path)
    model = load_backbone(BackboneConfig(source="file", file=path, **TINY_BACKBONE))
    assert_loaded(model, source_weights)


def test_file_source_refuses_a_pickle_with_code(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "payload": BackboneError("not a tensor")}, path)
    with pytest.raises(ArtifactError, match="weights_only"):
        load_backbone(BackboneConfig(source="file", file=path, **TINY_BACKBONE))


def test_weights_of_another_shape_are_refused_naming_the_keys(source_weights, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(source_weights, path)
    wider = {**TINY_BACKBONE, "embed_dim": 96}
    with pytest.raises(BackboneError, match="backbone.file"):
        load_backbone(BackboneConfig(source="file", file=path, **wider))


def test_unknown_model_name_is_refused():
    with pytest.raises(BackboneError, match="backbone.name: 'vit_nonexistent' is not a timm model"):
        create_vit(BackboneConfig(name="vit_nonexistent", **TINY_BACKBONE))


def test_pretrain_source_needs_the_pretrain_stage_weights():
    with pytest.raises(BackboneError, match="pretrain stage"):
        load_backbone(BackboneConfig(source="pretrain", **TINY_BACKBONE))


def test_a_half_precision_file_loads_into_the_float32_model_with_nothing_left_uninitialised(source_weights, tmp_path):
    """The model is built on the meta device and handed the file's tensors: each must come out float32 (as a
    copy into a randomly initialised model would) and none may stay on the meta device."""
    path = tmp_path / "w.safetensors"
    save_file({k: v.half() for k, v in source_weights.items()}, path)
    model = load_backbone(BackboneConfig(source="file", file=path, **TINY_BACKBONE))
    assert_loaded(model, {k: v.half().float() for k, v in source_weights.items()})
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t.dtype == torch.float32 and not t.is_meta for t in tensors)
    images = torch.rand(2, 3, model.patch_embed.img_size[0], model.patch_embed.img_size[1])
    assert torch.isfinite(model.forward_features(images)).all()
