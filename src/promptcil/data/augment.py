"""Training augmentation on the device: a random resized crop and a horizontal flip per image.

The whole batch is resampled in one `grid_sample` (each image its own affine crop and flip) straight to
the model's input size, so the images never go back to the host and the crop is resampled once. The
per-image parameters are drawn on the CPU from a generator seeded by (run seed, task, epoch) for the
*global* batch, and each rank takes its rows: one process and N processes see the same crops, and a run
resumed at an epoch boundary continues with the crops it would have drawn. Off (the default), training
sees exactly the images it saw before.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from promptcil.config.sections import AugmentConfig


def draw_crops(cfg: AugmentConfig, count: int, generator: torch.Generator) -> torch.Tensor:
    """(count, 2, 3) affine matrices (affine_grid's, normalised coordinates): each a crop of the drawn area
    and ratio at a uniform position, mirrored for the images drawn to flip."""
    theta = torch.zeros(count, 2, 3)
    width = height = torch.ones(count)
    if cfg.crop_scale is not None:
        area = torch.empty(count).uniform_(*cfg.crop_scale, generator=generator)
        log_ratio = torch.empty(count).uniform_(math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]),
                                                generator=generator)
        ratio = log_ratio.exp()
        width, height = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
        theta[:, 0, 2] = (torch.rand(count, generator=generator) * 2 - 1) * (1 - width)
        theta[:, 1, 2] = (torch.rand(count, generator=generator) * 2 - 1) * (1 - height)
    mirror = torch.ones(count)
    if cfg.flip:
        mirror = torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0)
    theta[:, 0, 0] = width * mirror
    theta[:, 1, 1] = height
    return theta


def apply_crops(images: torch.Tensor, theta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, *size): every image resampled through its own `theta` (bilinear,
    borders repeated), on the images' device."""
    if len(images) == 0:
        return images.new_empty((0, images.shape[1], *size))
    grid = F.affine_grid(theta.to(images.device), [len(images), images.shape[1], *size], align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)
