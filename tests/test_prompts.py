"""Prompt methods on a real (random-weight) timm ViT: exactness of APT and cost of each method."""

from __future__ import annotations

import pytest
import torch

from promptcil.backbone import load_backbone
from promptcil.config import BackboneConfig, MethodConfig
from promptcil.evaluation import gflops_per_image
from promptcil.prompts import create_method

from conftest import TINY_BACKBONE, make_params


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(BackboneConfig(source="random", **TINY_BACKBONE), seed=0)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def plain_features(backbone, images):
    return backbone.forward_head(backbone.forward_features(images), pre_logits=True)


def method(name: str, backbone, **options):
    cfg = MethodConfig.model_validate({"name": name, **({name: options} if options else {})})
    m = create_method(cfg, backbone)
    m.attach()
    return m


def test_apt_zero_prompt_is_the_plain_backbone(backbone, images):
    apt = method("apt", backbone)
    with torch.no_grad():
        apt.additive_cls_prompt.zero_()
        torch.testing.assert_close(apt(images), plain_features(backbone, images), rtol=0, atol=1e-6)
    apt.detach()


def test_apt_prompt_touches_only_the_cls_key_and_value(backbone, images):
    """Inside the first prompted block only the CLS row's key and value change; queries and patch
    keys/values are exactly the plain ones, and no token is added."""
    dim = backbone.embed_dim
    qkv = backbone.blocks[0].attn.qkv

    def capture_qkv(run) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        hook = qkv.register_forward_hook(lambda _m, _i, out: seen.append(out.clone()))  # runs after APT's
        with torch.no_grad():
            out = run(images)
        hook.remove()
        return seen[0], out

    plain_qkv, _ = capture_qkv(lambda x: plain_features(backbone, x))
    apt = method("apt", backbone)
    prompted_qkv, prompted_out = capture_qkv(apt)
    apt.detach()
    assert prompted_qkv.shape == plain_qkv.shape  # sequence length unchanged
    diff = (prompted_qkv - plain_qkv).abs()
    assert diff[:, 1:].max() == 0, "patch rows of q/k/v must be untouched"
    assert diff[:, 0, :dim].max() == 0, "the CLS query must be untouched"
    expected = apt.additive_cls_prompt[0].reshape(-1).expand(len(images), -1)
    torch.testing.assert_close(prompted_qkv[:, 0, dim:] - plain_qkv[:, 0, dim:], expected)
    assert not torch.allclose(prompted_out, plain_features(backbone, images))


def test_apt_merges_prompts_across_tasks(backbone):
    apt = method("apt", backbone, merge_momentum=0.7)
    first = apt.additive_cls_prompt.detach().clone()
    apt.end_task()
    torch.testing.assert_close(apt.merged_prompt, first)
    with torch.no_grad():
        apt.additive_cls_prompt.add_(1.0)
    apt.end_task()
    torch.testing.assert_close(apt.merged_prompt, 0.7 * first + 0.3 * (first + 1.0))
    apt.eval()
    assert apt.active_prompt() is apt.merged_prompt
    apt.train()
    assert apt.active_prompt() is apt.additive_cls_prompt
    apt.detach()


def test_apt_parameter_count_is_two_vectors_per_block(backbone):
    apt = method("apt", backbone)
    assert sum(p.numel() for p in apt.parameters()) == len(backbone.blocks) * 2 * backbone.embed_dim
    apt.detach()


def test_vpt_deep_and_shallow_shapes(backbone, images):
    deep = method("vpt", backbone, length=3, deep=True)
    shallow = method("vpt", backbone, length=3, deep=False)
    assert deep.prompt_tokens.shape == (len(backbone.blocks), 3, backbone.embed_dim)
    assert shallow.prompt_tokens.shape == (1, 3, backbone.embed_dim)
    tokens = deep.embed(images)
    assert deep.before_block(0, tokens).shape[1] == tokens.shape[1] + 3
    deep.attach()
    assert deep(images).shape == (len(images), backbone.embed_dim)
    shallow.attach()
    assert shallow(images).shape == (len(images), backbone.embed_dim)


def test_l2p_chooses_top_k_and_sets_key_loss(backbone, images):
    pool = method("l2p", backbone, pool_size=6, length=2, top_k=3)
    features = pool(images)
    assert features.shape == (len(images), backbone.embed_dim)
    assert pool.aux_loss is not None and pool.aux_loss.requires_grad


def test_flops_apt_vpt_l2p_against_plain(backbone, images):
    plain = gflops_per_image(lambda x: plain_features(backbone, x), images)
    apt = method("apt", backbone)
    apt_flops = gflops_per_image(apt, images)
    apt.detach()
    vpt = gflops_per_image(method("vpt", backbone, length=10, deep=True), images)
    l2p = gflops_per_image(method("l2p", backbone, pool_size=10, length=1, top_k=1), images)
    assert apt_flops / plain <= 1.01
    assert vpt > plain
    assert 1.9 <= l2p / plain <= 2.2  # query pass + a prompted pass with one extra token


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"method": {"name": "coop"}}, "method.name"),
        ({"backbone": {"img_size": 30, "patch_size": 4}}, "backbone"),
        ({"method": {"vpt": {"length": 0}}}, "method.vpt.length"),
        ({"method": {"l2p": {"pool_size": 2, "top_k": 5}}}, "method.l2p"),
        ({"train": {"lr": -1}}, "train.lr"),
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"trian": {}}, "trian"),
        ({"train": {"batch_size": "big"}}, "train.batch_size"),
        ({"head": {"ridge": {"projection_dim": 0}}}, "head.ridge.projection_dim"),
    ],
)
def test_bad_params_fail_with_one_line_naming_the_key(raw, key):
    from promptcil.config import ConfigError, parse_params

    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    message = str(info.value)
    assert "\n" not in message
    assert f": {key}" in message or f"{key}:" in message, message


def test_apt_blocks_out_of_range_is_rejected(backbone):
    with pytest.raises(ValueError, match="method.apt.blocks"):
        method("apt", backbone, blocks=[0, 99])


def test_make_params_helper_is_valid():
    assert make_params().backbone.img_size == 16


def test_apt_gradients_equal_an_out_of_place_rebuild_of_the_cls_key_and_value():
    """APT's add into the qkv output has a hand-written backward (identity for the activations, a batch
    sum for the prompt): the loss, the prompt's gradient and the image's gradient must equal those of
    the plain autograd version that rebuilds the CLS row's key and value with torch.cat."""
    torch.manual_seed(0)
    backbone = load_backbone(BackboneConfig(**TINY_BACKBONE, source="random"))
    apt = create_method(MethodConfig.model_validate({"name": "apt"}), backbone)
    apt.train()
    images = torch.randn(4, 3, backbone.patch_embed.img_size[0], backbone.patch_embed.img_size[1], requires_grad=True)

    def loss_and_grads() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        apt.additive_cls_prompt.grad, images.grad = None, None
        loss = backbone.forward_features(images)[:, 0].pow(2).sum()
        loss.backward()
        return loss.detach(), apt.additive_cls_prompt.grad.clone(), images.grad.clone()

    apt.attach()
    fast = loss_and_grads()
    apt.detach()
    dim = backbone.embed_dim

    def reference_hook(slot: int):
        def rebuild(_module, _inputs, qkv: torch.Tensor) -> torch.Tensor:
            cls = torch.cat([qkv[:, :1, :dim], qkv[:, :1, dim:] + apt.additive_cls_prompt[slot].reshape(1, 1, -1)], 2)
            return torch.cat([cls, qkv[:, 1:]], dim=1)
        return rebuild

    handles = [block.attn.qkv.register_forward_hook(reference_hook(s)) for s, block in enumerate(backbone.blocks)]
    reference = loss_and_grads()
    for handle in handles:
        handle.remove()
    assert torch.allclose(fast[0], reference[0])
    assert fast[1].abs().max() > 0
    torch.testing.assert_close(fast[1], reference[1])
    torch.testing.assert_close(fast[2], reference[2])
