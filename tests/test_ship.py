"""SHIP: the hierarchy builder, equivalence with VPT-deep when SHIP's extras are off, decoupled attention,
parameters per level, attribute prompts, state round trips, and a frozen backbone after training."""

from __future__ import annotations

import pytest
import torch

from promptcil.config import ConfigError, MethodConfig
from promptcil.features import layer_affinity
from promptcil.prompts.ship import SemanticHierarchicalPrompt, ShipConfig, semantic_levels
from promptcil.prompts.vpt import VisualPromptTokens
from promptcil.training import IncrementalTrainer

from conftest import build_model, make_params

BARE = dict(ssp_length=0, attribute_layers=0, decoupled_attention=False, matching_loss_weight=0.0)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def features(method, images: torch.Tensor) -> torch.Tensor:
    method.attach()
    with torch.no_grad():
        return method.eval()(images)


def test_levels_are_contiguous_groups_cut_where_affinity_to_the_anchor_drops():
    similar = {(0, 1), (2, 3), (2, 4), (3, 4)}
    affinity = torch.full((6, 6), 0.2)
    for i in range(6):
        affinity[i, i] = 1.0
    for i, j in similar:
        affinity[i, j] = affinity[j, i] = 0.95
    assert semantic_levels(affinity, threshold=0.9) == [0, 2, 5]  # levels [0, 1], [2, 3, 4], [5]
    assert semantic_levels(affinity, threshold=0.1) == [0]  # everything alike: one level
    assert semantic_levels(affinity, threshold=1.01 - 1e-9) == list(range(6))  # nothing alike: a level per block


def test_layer_affinity_is_per_image_cosine_averaged():
    tokens = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]])  # 2 images, 2 blocks
    torch.testing.assert_close(layer_affinity(tokens), torch.tensor([[1.0, 0.5], [0.5, 1.0]]))


def test_one_level_per_block_without_extras_is_vpt_deep(random_backbone, images):
    vpt = VisualPromptTokens(random_backbone, length=3, deep=True)
    ship = SemanticHierarchicalPrompt(random_backbone, ShipConfig(sip_length=3, **BARE))
    with torch.no_grad():
        ship.semantic_independent.copy_(vpt.prompt_tokens * 30)  # large prompts: a difference would show
        vpt.prompt_tokens.mul_(30)
    torch.testing.assert_close(features(ship, images), features(vpt, images), rtol=1e-4, atol=1e-5)


def test_decoupled_attention_with_zero_scale_leaves_the_image_tokens_alone(random_backbone, images):
    plain = features(build_model(make_params(method={"name": "none"}), random_backbone).method, images)
    ship = SemanticHierarchicalPrompt(random_backbone, ShipConfig(decoupled_scale=0.0, attribute_layers=0))
    with torch.no_grad():
        ship.semantic_independent.normal_(std=5.0)
    torch.testing.assert_close(features(ship, images), plain, rtol=1e-4, atol=1e-5)
    ship.cfg = ShipConfig(decoupled_scale=0.1, attribute_layers=0)
    assert not torch.allclose(features(ship, images), plain, atol=1e-3)  # the prompts do enter at s > 0


def test_blocks_inside_a_level_add_no_prompt_parameters(random_backbone):
    cfg = ShipConfig(sip_length=5, ssp_length=4, attribute_layers=1, attribute_length=3)
    ship = SemanticHierarchicalPrompt(random_backbone, cfg, anchors=[0, 2])
    assert ship.levels() == [[0, 1], [2, 3]]
    dim = random_backbone.embed_dim
    assert ship.semantic_independent.shape == (2, 5, dim)  # one set per level, not per block
    assert sum(p.numel() for p in ship.parameters()) == (2 * 5 + 4 + 1 * 3) * dim
    ship.set_levels([0, 1, 2, 3])
    assert ship.semantic_independent.shape == (4, 5, dim)
    with pytest.raises(ValueError, match="must start at 0"):
        ship.set_levels([1, 2])


def test_attribute_tokens_take_the_nearest_prototype(random_backbone):
    cfg = ShipConfig(attribute_length=2, attribute_prototypes=3, attribute_weight=1.0)
    ship = SemanticHierarchicalPrompt(random_backbone, cfg)
    dim = random_backbone.embed_dim
    bank = torch.eye(3, dim)
    ship.attribute_bank.copy_(bank)
    tokens = torch.zeros(1, 4, dim)  # CLS + 3 patches
    tokens[0, 1, 2], tokens[0, 2, 0], tokens[0, 3, 1] = 1.0, 1.0, 1.0
    attention = torch.tensor([[0.4, 0.1, 0.3, 0.2]])  # CLS attends most to patch 2 (then 3), itself excluded
    got = ship._attribute_tokens(tokens, attention, slot=0)
    torch.testing.assert_close(got[0], bank[[0, 1]])  # weight 1: each token IS its nearest prototype


def test_state_carries_the_grouping_and_any_instance_loads_it(random_backbone, images):
    cfg = ShipConfig(attribute_prototypes=5)
    source = SemanticHierarchicalPrompt(random_backbone, cfg, anchors=[0, 3])
    with torch.no_grad():
        source.attribute_bank.normal_()
    expected = features(source, images)
    fresh = SemanticHierarchicalPrompt(random_backbone, cfg)  # default: a level per block
    fresh.load_state_dict(source.state_dict())
    assert fresh.levels() == [[0, 1, 2], [3]]
    torch.testing.assert_close(features(fresh, images), expected)


def test_training_sets_the_matching_loss_and_leaves_the_backbone_bit_identical(random_backbone, digits_tasks, tmp_path):
    ship_params = {"sip_length": 2, "ssp_length": 2, "attribute_length": 2, "attribute_prototypes": 4}
    params = make_params(method={"name": "ship", "ship": ship_params}, train={"epochs": 1, "batch_size": 64})
    model = build_model(params, random_backbone)
    model.method.attribute_bank.normal_()
    before = {k: v.clone() for k, v in random_backbone.state_dict().items()}
    start = model.method.semantic_independent.detach().clone()
    model.train()
    model.features(digits_tasks.train.images[:8])
    assert model.method.aux_loss is not None and float(model.method.aux_loss.detach()) > 0
    IncrementalTrainer(model, digits_tasks.split, params.train, tmp_path, progress=False).run(digits_tasks.train,
                                                                                              tasks=[0])
    assert all(torch.equal(v, random_backbone.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(model.method.semantic_independent.detach(), start)


def test_ship_config_errors_are_one_line():
    with pytest.raises(ConfigError, match=r"method.ship.decoupled_scale: Input should be less than or equal to 1"):
        make_params(method={"name": "ship", "ship": {"decoupled_scale": 2}})
    assert MethodConfig(name="ship").ship.matching_loss_weight == 0.5
