"""Prompt initialisers and prompt ensembling: shapes, provenance (each init comes from the data it
claims), and an ensemble of identical members predicting like one member."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.cluster import KMeans

from promptcil.config import ConfigError
from promptcil.features import backbone_statistics, block_token_sample, class_means, sample_images
from promptcil.init import initialise
from promptcil.model import IncrementalModel
from promptcil.prompts.ensemble import PromptEnsemble

from conftest import build_model, make_params, tiny_random_backbone


@pytest.fixture(scope="module")
def task0_stats(digits_tasks) -> dict[str, torch.Tensor]:
    """What the features and prototypes stages hand the initialisers: task 0's statistics (of the same
    seeded backbone every test's random_backbone is)."""
    random_backbone = tiny_random_backbone()
    base = digits_tasks.split.task_classes(0)
    stats = backbone_statistics(random_backbone, digits_tasks.train, 256, torch.device("cpu"))
    keep = torch.isin(stats["labels"], torch.as_tensor(list(base)))
    sample = sample_images(digits_tasks.train, base, 32, seed=0)
    return {
        "class_features": class_means(stats["cls"][keep], stats["labels"][keep], len(base)),
        "block_class_tokens": class_means(stats["block_input_tokens"][keep], stats["labels"][keep],
                                          len(base)).transpose(0, 1),
        "block_token_sample": block_token_sample(random_backbone, sample, 256, torch.device("cpu")),
        "sample_labels": sample.labels,
    }


def initialised(backbone, stats, seed: int = 0, **sections):
    params = make_params(**sections)
    method = build_model(params, backbone).method
    initialise(method, stats, params.init, seed)
    return method


def rows_in(rows: torch.Tensor, pool: torch.Tensor) -> bool:
    """Every row of `rows` is (exactly) one of `pool`'s rows."""
    return bool((torch.cdist(rows.double(), pool.double()).min(dim=1).values < 1e-6).all())


def test_token_sample_holds_every_token_entering_every_block_for_task0_images(task0_stats, digits_tasks):
    sample = task0_stats["block_token_sample"]
    assert sample.shape == (5, 32, 16, 48)  # entering each of 4 blocks + leaving the last x images x patches x width
    assert set(task0_stats["sample_labels"].tolist()) <= set(digits_tasks.split.task_classes(0))
    assert not torch.equal(sample[0], sample[1])  # block 1's input is block 0's output, not the embedding


def test_token_sample_batches_bounded_by_bytes_give_the_same_tokens(task0_stats, digits_tasks, monkeypatch):
    """Big images' tokens are taken a few images at a time (TOKEN_BATCH_BYTES): the same sample either way."""
    import promptcil.features as features

    per_image = 4 * 5 * 16 * 48  # (depth + 1) x patches x width float32 of the tiny backbone
    monkeypatch.setattr(features, "TOKEN_BATCH_BYTES", 3 * per_image)  # batches of 3 images, not 256
    sample = sample_images(digits_tasks.train, digits_tasks.split.task_classes(0), 32, seed=0)
    small_batches = block_token_sample(tiny_random_backbone(), sample, 256, torch.device("cpu"))
    assert torch.allclose(small_batches, task0_stats["block_token_sample"], atol=1e-5)


@pytest.mark.parametrize(
    "method", [{"name": "vpt", "vpt": {"length": 6}}, {"name": "vpt", "vpt": {"length": 6, "deep": False}}])
def test_spt_kmeans_slots_are_scikit_learn_centres_of_the_tokens_entering_each_block(
    method, random_backbone, task0_stats
):
    vpt = initialised(random_backbone, task0_stats, seed=3, method=method, init={"name": "spt"})
    blocks, slots = vpt.token_slots()
    assert vpt.prompt_tokens.shape == (len(blocks), 6, 48)
    for layer, block in enumerate(blocks):
        tokens = task0_stats["block_token_sample"][block].flatten(0, 1).double().numpy()
        centres = KMeans(n_clusters=slots, random_state=3, n_init=1).fit(tokens).cluster_centers_
        torch.testing.assert_close(vpt.prompt_tokens[layer], torch.from_numpy(centres).float())


def test_spt_sample_and_sampled_tokens_draw_real_tokens_of_the_right_block(random_backbone, task0_stats):
    sample = task0_stats["block_token_sample"]
    spt = initialised(random_backbone, task0_stats, method={"name": "vpt", "vpt": {"length": 5}},
                      init={"name": "spt", "spt": {"mode": "sample"}})
    lester = initialised(random_backbone, task0_stats, method={"name": "vpt", "vpt": {"length": 5}},
                         init={"name": "sampled_tokens"})
    for layer in range(4):
        assert rows_in(spt.prompt_tokens[layer], sample[layer].flatten(0, 1))
        assert rows_in(lester.prompt_tokens[layer], sample[0].flatten(0, 1))  # the 'vocabulary': patch embeddings
    assert not rows_in(spt.prompt_tokens[2], sample[0].flatten(0, 1))


def test_spt_mean_pooling_slots_are_means_of_windows_of_one_image(random_backbone, task0_stats):
    vpt = initialised(random_backbone, task0_stats, method={"name": "vpt", "vpt": {"length": 5}},
                      init={"name": "spt", "spt": {"mode": "mean_pooling", "window": 4}})
    tokens = task0_stats["block_token_sample"][1]  # (images, 16 patches, D)
    by_hand = tokens.view(tokens.shape[0], 4, 4, -1).mean(dim=2).flatten(0, 1)  # 4 windows of 4 per image
    assert rows_in(vpt.prompt_tokens[1], by_hand)


def test_class_prototype_slots_cycle_through_the_class_means(random_backbone, task0_stats):
    vpt = initialised(random_backbone, task0_stats, method={"name": "vpt", "vpt": {"length": 6}},
                      init={"name": "class_prototype"})
    class_tokens = task0_stats["block_class_tokens"]  # (blocks, 4 classes, D)
    for layer in range(4):
        torch.testing.assert_close(vpt.prompt_tokens[layer], class_tokens[layer][[0, 1, 2, 3, 0, 1]])


def test_apt_prompt_is_the_key_value_of_its_token_at_the_init_scale(random_backbone, task0_stats):
    apt = initialised(random_backbone, task0_stats, method={"name": "apt"}, init={"name": "class_prototype"})
    assert apt.token_slots() == ([0, 1, 2, 3], 1)
    for slot, block_index in enumerate(apt.blocks):
        block = random_backbone.blocks[block_index]
        token = task0_stats["block_class_tokens"][block_index][0]  # one slot per block: class 0's mean token
        key_value = (block.norm1(token) @ block.attn.qkv.weight[48:].T).view(2, 48)
        prompt = apt.additive_cls_prompt[slot]
        for part in range(2):
            cosine = torch.nn.functional.cosine_similarity(prompt[part], key_value[part], dim=0)
            assert cosine > 1 - 1e-5
            assert prompt[part].pow(2).mean().sqrt().item() == pytest.approx(0.02, rel=1e-4)


def test_init_scale_sets_the_rms_of_token_prompts(random_backbone, task0_stats):
    vpt = initialised(random_backbone, task0_stats, method={"name": "vpt", "vpt": {"length": 4}},
                      init={"name": "spt", "spt": {"mode": "sample"}, "scale": 0.5})
    rms = vpt.prompt_tokens.pow(2).flatten(1).mean(dim=1).sqrt()
    torch.testing.assert_close(rms, torch.full((4,), 0.5))


def test_random_init_distributions_and_scale(random_backbone, task0_stats):
    default = initialised(random_backbone, task0_stats, method={"name": "vpt", "vpt": {"length": 50}})
    torch.manual_seed(0)
    assert default.prompt_tokens.std().item() == pytest.approx(0.02, rel=0.05)  # the method's own init, kept
    uniform = initialised(random_backbone, task0_stats, method={"name": "vpt", "vpt": {"length": 50}},
                          init={"distribution": "uniform", "scale": 0.1})
    bound = math.sqrt(3) * 0.1
    assert uniform.prompt_tokens.abs().max() <= bound
    assert uniform.prompt_tokens.abs().max() > 0.95 * bound  # uniform, not normal, fills the interval
    assert uniform.prompt_tokens.std().item() == pytest.approx(0.1, rel=0.05)
    l2p = initialised(random_backbone, task0_stats, method={"name": "l2p"}, init={"scale": 0.3})
    assert l2p.prompt_pool.std().item() == pytest.approx(0.3, rel=0.1)
    assert l2p.prompt_keys.abs().max() <= 1  # keys keep L2P's uniform [-1, 1]


def test_too_few_tokens_for_kmeans_is_a_clear_error(random_backbone, task0_stats):
    few = {**task0_stats, "block_token_sample": task0_stats["block_token_sample"][:, :1, :2]}
    with pytest.raises(ValueError, match="raise init.sample_images"):
        initialised(random_backbone, few, method={"name": "vpt", "vpt": {"length": 5}}, init={"name": "spt"})


# ---------------------------------------------------------------- ensembling


@pytest.mark.parametrize("method", ["apt", "vpt"])
def test_ensemble_of_identical_members_predicts_like_one_member(method, random_backbone, digits_tasks):
    single = build_model(make_params(method={"name": method, "vpt": {"length": 2}}), random_backbone)
    single.head.add_classes(4)
    ensemble = build_model(make_params(method={"name": method, "vpt": {"length": 2}, "ensemble": 3}),
                           random_backbone)
    assert isinstance(ensemble.method, PromptEnsemble) and ensemble.method.size == 3
    ensemble.head.add_classes(4)
    for member, head in zip(ensemble.method.members, ensemble.head.heads):
        member.load_state_dict(single.method.state_dict())
        head.load_state_dict(single.head.state_dict())
    images = digits_tasks.test.images[:40]
    with torch.no_grad():
        single.method.attach()
        expected = single.eval()(images)
        ensemble.method.attach()
        got = ensemble.eval()(images)
    assert got.shape == expected.shape == (40, 4)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_ensemble_members_train_side_by_side_from_different_inits(random_backbone, digits_tasks, tmp_path):
    from promptcil.training import IncrementalTrainer

    params = make_params(method={"name": "apt", "ensemble": 2}, train={"epochs": 1, "batch_size": 64})
    model = build_model(params, random_backbone)
    first, second = model.method.members
    assert not torch.equal(first.additive_cls_prompt, second.additive_cls_prompt)
    before = {k: v.clone() for k, v in random_backbone.state_dict().items()}
    IncrementalTrainer(model, digits_tasks.split, params.train, tmp_path, progress=False).run(digits_tasks.train,
                                                                                              tasks=[0])
    assert all(torch.equal(v, random_backbone.state_dict()[k]) for k, v in before.items())
    assert model.head.heads[0].num_classes == model.head.heads[1].num_classes == 4
    model.eval()
    with torch.no_grad():
        logits = model(digits_tasks.test.images[:16])
    assert logits.shape == (16, 4)
    # a reloaded task state rebuilds every member and head
    from promptcil.training import load_task_state, task_state_path

    torch.manual_seed(99)
    fresh = IncrementalModel.from_params(params, random_backbone)
    load_task_state(fresh, task_state_path(tmp_path, 0))
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(digits_tasks.test.images[:16]), logits)


def test_ensemble_of_a_method_that_cannot_be_ensembled_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"method: .*ensemble 2 needs method apt or vpt, not l2p"):
        make_params(method={"name": "l2p", "ensemble": 2})


def test_ensemble_with_an_analytic_head_adapts_each_member_on_the_first_task(random_backbone, digits_tasks, tmp_path):
    from promptcil.training import IncrementalTrainer

    params = make_params(method={"name": "apt", "ensemble": 2}, head={"name": "prototype"},
                         train={"epochs": 1, "batch_size": 64})
    model = build_model(params, random_backbone)
    first, second = model.method.members
    before = [first.additive_cls_prompt.detach().clone(), second.additive_cls_prompt.detach().clone()]
    IncrementalTrainer(model, digits_tasks.split, params.train, tmp_path, progress=False).run(digits_tasks.train,
                                                                                              tasks=[0, 1])
    # both members' prompts were adapted on task 0 (through a linear head each), then kept
    assert not torch.equal(first.additive_cls_prompt.detach(), before[0])
    assert not torch.equal(second.additive_cls_prompt.detach(), before[1])
    assert [head.num_classes for head in model.head.heads] == [6, 6]
    with torch.no_grad():
        assert model.eval()(digits_tasks.test.images[:16]).shape == (16, 6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_features_land_on_the_host_in_order_through_the_staging_ring(digits_tasks, random_backbone):
    """On a GPU, results go through a ring of 3 page-locked staging buffers (docs/performance.md): with
    more batches than slots and a short last batch, every row must land where a plain copy puts it."""
    from promptcil.features import _entering_tokens

    gpu = torch.device("cuda")
    data = digits_tasks.train  # 7 batches of 200 (the last one short) through 3 slots
    stats = backbone_statistics(random_backbone, data, 200, gpu)
    cls, blocks = [], []
    for c, entering in _entering_tokens(random_backbone, data, 200, gpu):
        cls.append(c.float().cpu())
        blocks.append(torch.stack([t.mean(dim=1) for t in entering], dim=1).float().cpu())
    assert torch.equal(stats["cls"], torch.cat(cls))
    assert torch.equal(stats["block_input_tokens"], torch.cat(blocks))
    sample = sample_images(data, digits_tasks.split.task_classes(0), 500, seed=0)
    tokens = block_token_sample(random_backbone, sample, 200, gpu)
    expected = torch.cat([torch.stack(e, dim=0).float().cpu()
                          for _, e in _entering_tokens(random_backbone, sample, 200, gpu, with_output=True)], dim=1)
    assert torch.equal(tokens, expected)
