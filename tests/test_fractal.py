"""Formula-driven pretraining: fractal images (determinism, classes, the filter), their config, the
presets, and a tiny fractal-pretrained pipeline run through the real stage functions."""

from __future__ import annotations

import os

import pytest
import torch

from promptcil.artifacts import read_json
from promptcil.config import ConfigError, FractalConfig, merged_params, parse_params
from promptcil.data import DataError, make_task_split
from promptcil.data.fractal import (
    IteratedFunctionSystem,
    class_generator,
    class_systems,
    filled_fractions,
    fractal_images,
)

from conftest import REPO, TINY_BACKBONE, run_stages, write_params

SMALL = FractalConfig(classes=4, images_per_class=6, points=256)


def test_generation_is_bit_identical_for_a_seed():
    first, second = fractal_images(SMALL, 16, progress=False), fractal_images(SMALL, 16, progress=False)
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.labels, second.labels)
    assert first.class_names == second.class_names == ["fractal_000", "fractal_001", "fractal_002", "fractal_003"]
    assert first.images.shape == (24, 1, 16, 16) and first.images.dtype == torch.uint8
    assert first.labels.tolist() == [k for k in range(4) for _ in range(6)]
    assert all(image.any() for image in first.images)  # every image shows its shape


def test_images_differ_across_classes_and_seeds_and_classes_do_not_depend_on_their_number():
    data = fractal_images(SMALL, 16, progress=False)
    means = torch.stack([data.images[data.labels == k].float().mean(0) for k in range(4)])
    for i in range(4):
        for j in range(i + 1, 4):
            assert (means[i] - means[j]).abs().mean() > 5, f"classes {i} and {j} look alike"
    within = data.images[data.labels == 0]
    assert not torch.equal(within[0], within[1])  # the per-image jitter varies a class's renderings
    other_seed = fractal_images(SMALL.model_copy(update={"seed": 1}), 16, progress=False)
    assert not torch.equal(data.images, other_seed.images)
    more_classes = fractal_images(SMALL.model_copy(update={"classes": 6}), 16, progress=False)
    assert torch.equal(more_classes.images[: len(data)], data.images)  # adding classes keeps the old ones


def test_colour_images_have_three_channels_and_one_colour_each():
    data = fractal_images(SMALL.model_copy(update={"colour": True}), 16, progress=False)
    assert data.images.shape == (24, 3, 16, 16)
    image = data.images[0].float()
    lit = image.amax(0) > 0
    ratios = image[:, lit] / image[:, lit].amax(0)
    assert torch.allclose(ratios, ratios[:, :1].expand_as(ratios), atol=0.05)  # one hue, shaded by density


def test_the_filter_drops_a_system_collapsing_onto_a_line_and_keeps_a_sierpinski_triangle():
    # Rank-1 linear parts whose range is the diagonal, translations along it: the attractor is a segment.
    line = IteratedFunctionSystem(torch.tensor([
        [0.3, 0.2, 0.3, 0.2, 0.1, 0.1],
        [0.4, -0.1, 0.4, -0.1, -0.5, -0.5],
        [-0.2, 0.5, -0.2, 0.5, 0.3, 0.3],
    ], dtype=torch.float64))
    # Every map sends everything to one point: the attractor is 3 points.
    points = IteratedFunctionSystem(torch.tensor([[0, 0, 0, 0, x, y] for x, y in ((0, 0), (1, 0), (0, 1))],
                                                 dtype=torch.float64))
    corners = ((0, 0), (0.5, 0), (0.25, 0.5))
    sierpinski = IteratedFunctionSystem(torch.tensor([[0.5, 0, 0, 0.5, x, y] for x, y in corners], dtype=torch.float64))
    filled = filled_fractions([line, points, sierpinski], [class_generator(0, k) for k in range(3)])
    threshold = FractalConfig().min_filled_fraction
    assert filled[0] < threshold and filled[1] < threshold
    assert filled[2] >= threshold
    # Every system the generator keeps passes the same filter.
    generators = [class_generator(0, k) for k in range(8)]
    kept = class_systems(FractalConfig(), generators)
    assert (filled_fractions(kept, [class_generator(9, k) for k in range(8)]) >= threshold * 0.8).all()


def test_kept_systems_are_contractive_after_any_jitter():
    config = FractalConfig(jitter=0.3)
    for system in class_systems(config, [class_generator(0, k) for k in range(16)]):
        linear = system.maps[:, :4].view(-1, 1, 2, 2)
        # The spectral norm is convex in the jitter, so its maximum is at a corner of the jitter box.
        corners = torch.cartesian_prod(*[torch.tensor([-1.0, 1.0], dtype=torch.float64)] * 4).view(1, 16, 2, 2)
        assert (torch.linalg.matrix_norm(linear * (1 + config.jitter * corners), ord=2) < 1).all()
        assert config.min_maps <= len(system.maps) <= config.max_maps


@pytest.mark.parametrize("fractal, expected", [
    ({"min_maps": 4, "max_maps": 3}, "backbone.pretrain.fractal: min_maps 4 exceeds max_maps 3"),
    ({"min_maps": 1}, "backbone.pretrain.fractal.min_maps: Input should be greater than or equal to 2"),
    ({"jitter": -0.1}, "backbone.pretrain.fractal.jitter: Input should be greater than or equal to 0"),
    ({"min_filled_fraction": 1}, "backbone.pretrain.fractal.min_filled_fraction: Input should be less than 1"),
    ({"colours": True}, "backbone.pretrain.fractal.colours: unknown key"),
])
def test_bad_fractal_params_fail_in_one_line_naming_the_key(fractal, expected):
    with pytest.raises(ConfigError) as err:
        parse_params({"backbone": {"pretrain": {"data": "fractal", "fractal": fractal}}})
    assert str(err.value).startswith(f"params.yaml: {expected}")
    assert "\n" not in str(err.value)


def test_an_unsatisfiable_filter_fails_in_one_line():
    with pytest.raises(DataError, match=r"^backbone\.pretrain\.fractal\.min_filled_fraction: .*lower it$"):
        fractal_images(FractalConfig(classes=1, images_per_class=1, min_filled_fraction=0.99), 16, progress=False)


def test_the_default_and_the_fashion_preset_pretrain_on_fractals_and_split_every_class_into_tasks_of_two():
    digits = parse_params(merged_params(REPO / "params.yaml"))
    fashion = parse_params(merged_params(REPO / "params.yaml", REPO / "configs" / "fractal-fashion-mnist.yaml"))
    for params, source in ((digits, "digits"), (fashion, "fashion_mnist")):
        assert params.data.source == source
        assert params.backbone.source == "pretrain" and params.backbone.pretrain.data == "fractal"
        data = params.data
        split = make_task_split(10, data.base_classes, data.classes_per_task, data.class_order_seed)
        assert split.task_sizes == [2, 2, 2, 2, 2]  # task 0 is just the first task: no class seen before
    assert digits.backbone.img_size == 16  # the CPU default's tiny ViT


def test_fractal_generation_runs_on_cuda_like_on_the_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    on_cpu = fractal_images(SMALL, 32, "cpu", progress=False)
    on_gpu = fractal_images(SMALL, 32, "cuda", progress=False)
    assert torch.equal(on_cpu.labels, on_gpu.labels)
    # Same random numbers (CPU generators); the game's float rounding may move a rare point by a pixel,
    # which can change an image's peak count and so its grey levels by a level or two.
    assert (on_cpu.images.float() - on_gpu.images.float()).abs().mean() < 2


def test_a_tiny_fractal_pretraining_runs_through_the_pipeline(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    fractal = {"classes": 8, "images_per_class": 24, "points": 256}
    write_params(tmp_path, data={"base_classes": 2},
                 backbone={**TINY_BACKBONE, "source": "pretrain",
                           "pretrain": {"data": "fractal", "epochs": 2, "lr": 2e-3, "fractal": fractal}})
    result = run_stages(tmp_path)
    backbone = read_json(tmp_path / "outputs" / "backbone" / "backbone.json")
    assert backbone["data"] == "fractal"
    assert backbone["train_images"] == 8 * 24 and backbone["classes"] == 8
    assert sorted(os.listdir(tmp_path / "outputs" / "backbone")) == [
        "backbone.json", "weights.json", "weights.safetensors"
    ]  # the images are regenerated from params, never stored
    metrics = result["metrics"]
    assert len(metrics["accuracy_matrix"]) == 5
    assert 0 <= metrics["A_last"] <= 1
    assert result["registration"]["version"] == "1"
