"""Training augmentation on the device (train.augment): each image its own crop and flip, resampled once
to the model's size; seeded by (seed, task, epoch), so a resumed run is the straight run; off, nothing
changes (every other test runs with it off)."""

from __future__ import annotations

import pytest
import torch

from promptcil.config import AugmentConfig
from promptcil.data.augment import apply_crops, draw_crops

from conftest import Interrupted, interrupt_after, make_params
from conftest import train_run as run


def test_the_full_crop_is_the_image_and_the_flip_mirrors_it(digits_tasks):
    images = digits_tasks.train.images[:16]
    size = tuple(images.shape[-2:])
    whole = draw_crops(AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0)), 16, torch.Generator())
    assert torch.equal(apply_crops(images, whole, size), images)
    flips = draw_crops(AugmentConfig(flip=True), 16, torch.Generator().manual_seed(0))
    mirrored = flips[:, 0, 0] < 0
    assert 0 < mirrored.sum() < 16  # about half, each image its own draw
    out = apply_crops(images, flips, size)
    assert torch.equal(out[mirrored], images[mirrored].flip(-1))
    assert torch.equal(out[~mirrored], images[~mirrored])


def test_crops_are_drawn_per_image_within_the_scale_and_resampled_to_the_model_size(digits_tasks):
    cfg = AugmentConfig(crop_scale=(0.3, 0.6))
    theta = draw_crops(cfg, 256, torch.Generator().manual_seed(1))
    area = theta[:, 0, 0].abs() * theta[:, 1, 1]
    assert area.min() >= 0.3 * 0.999 and area.max() <= 0.6 * 1.001
    assert (theta[:, :, 2].abs() <= 1 - theta[:, [0, 1], [0, 1]].abs() + 1e-6).all()  # inside the image
    assert len({tuple(t.flatten().tolist()) for t in theta}) == 256
    out = apply_crops(digits_tasks.train.images[:4], theta[:4], (16, 16))
    assert out.shape == (4, 1, 16, 16) and out.dtype == torch.uint8
    assert torch.equal(draw_crops(cfg, 256, torch.Generator().manual_seed(1)), theta)  # seeded


def test_augmented_training_resumes_to_the_straight_run_and_differs_from_plain(random_backbone, digits_tasks,
                                                                               tmp_path):
    augment = {"crop_scale": [0.6, 1.0], "flip": True}
    params = make_params(method={"name": "apt"}, train={"epochs": 2, "augment": augment})
    straight = run(params, random_backbone, digits_tasks, tmp_path / "straight").trainable_state()
    with pytest.raises(Interrupted):
        run(params, random_backbone, digits_tasks, tmp_path / "resumed", on_epoch_end=interrupt_after(1, 0))
    resumed = run(params, random_backbone, digits_tasks, tmp_path / "resumed").trainable_state()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    plain = run(make_params(method={"name": "apt"}, train={"epochs": 2}), random_backbone, digits_tasks,
                tmp_path / "plain").trainable_state()
    assert any(not torch.equal(straight[k], plain[k]) for k in straight if k.startswith("method."))
