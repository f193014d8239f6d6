"""What every measurement shares: the run's settings (Run), device-resident random batches, random image sets."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer

from promptcil.backbone import load_backbone
from promptcil.config import BackboneConfig
from promptcil.data import ImageSet

HEAD_CLASSES, FIRST_CLASS = 20, 10  # a step of task 1 of 10 + 10 classes: old logits are masked, as in every later task
INPUT_BUFFERS = 4  # batches rotated through, so no step re-reads the previous one's input from cache
QUICK_BACKBONE = {"img_size": 32, "patch_size": 4, "depth": 2}  # a 2-block vit_tiny at 32 px: seconds on a CPU


@dataclass
class Run:
    """What the command line decided, shared by every measurement."""

    device: torch.device
    batch_size: int
    backbone_overrides: dict[str, int]
    steps: int
    repeats: int
    warmup: int

    def backbone(self, name: str) -> VisionTransformer:
        cfg = BackboneConfig(name=name, source="random", **self.backbone_overrides)
        return load_backbone(cfg).to(self.device)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass
class Batches:
    """INPUT_BUFFERS random uint8 batches (and labels of the simulated task) resident on the device."""

    images: list[torch.Tensor]
    labels: list[torch.Tensor]

    @classmethod
    def random(cls, run: Run, channels: int, size: tuple[int, int], seed: int = 0) -> "Batches":
        generator = torch.Generator().manual_seed(seed)
        shape = (run.batch_size, channels, *size)
        images = [torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator) for _ in range(INPUT_BUFFERS)]
        labels = [torch.randint(FIRST_CLASS, HEAD_CLASSES, (run.batch_size,), generator=generator)
                  for _ in range(INPUT_BUFFERS)]
        return cls([x.to(run.device) for x in images], [y.to(run.device) for y in labels])

    def pick(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i % INPUT_BUFFERS], self.labels[i % INPUT_BUFFERS]


def random_imageset(count: int, channels: int, size: tuple[int, int], labels: torch.Tensor, seed: int) -> ImageSet:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, channels, *size), dtype=torch.uint8, generator=generator)
    return ImageSet(images, labels, [str(c) for c in range(int(labels.max()) + 1)])
