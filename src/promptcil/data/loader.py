"""Batches of uint8 images from memory, and the preprocessing that runs on the device.

The host only slices uint8 tensors (a quarter of float32's bytes to copy); the
conversion, resize and normalisation run where the model runs, in one place, so
training, feature extraction and evaluation preprocess identically.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from promptcil.data.shards import ShardedImageSet, sharded_batches
from promptcil.data.sources import ImageSet
from promptcil.distributed import Ranks


def make_loader(
    imageset: ImageSet, batch_size: int, *, shuffle: bool, seed: int, pin_memory: bool = False,
    ranks: Ranks | None = None,
) -> DataLoader:
    """Yield `(uint8 images, int64 labels)` batches.

    Whole batches are gathered with one index operation (the sampler yields index
    lists), not sample by sample; with `pin_memory` straight into page-locked
    memory, ready for a non_blocking copy to the GPU. The shuffle order comes only
    from a generator seeded with `seed`: the n-th pass over a loader is a pure
    function of (`seed`, n), so a trainer that derives `seed` from (run seed, task,
    epoch) resumes bit-identically at an epoch boundary. Data is in memory, so no
    workers. With `ranks` (several processes, promptcil.distributed), each yields its
    contiguous shard of every global batch of that same order.
    """
    dataset = _BatchGather(imageset.images, imageset.labels, pin_memory)
    # its own generator: a DataLoader draws its workers' base seed from the global RNG at every pass otherwise,
    # which would shift what a later seeded draw (the heads' alignment samples) sees
    return DataLoader(dataset, sampler=batch_indices(len(dataset), batch_size, shuffle=shuffle, seed=seed, ranks=ranks),
                      batch_size=None, num_workers=0, generator=torch.Generator().manual_seed(seed))


def batch_indices(
    n: int, batch_size: int, *, shuffle: bool, seed: int, ranks: Ranks | None = None
) -> Iterable[list[int]]:
    """The lists of indices every loader (in memory or sharded) yields batches of: a seeded permutation of
    range(n) (or range(n) itself), cut into batches; with `ranks`, this rank's contiguous part of each.
    Each pass draws the next permutation of the same generator (a pure function of seed and pass)."""
    order = (RandomSampler(range(n), generator=torch.Generator().manual_seed(seed)) if shuffle
             else SequentialSampler(range(n)))
    batches = BatchSampler(order, batch_size=batch_size, drop_last=False)
    if ranks is None or not ranks.distributed:
        return batches
    return _RankPart(batches, ranks)


class _RankPart:
    """This rank's contiguous part of each batch of `batches`, pass after pass."""

    def __init__(self, batches: BatchSampler, ranks: Ranks) -> None:
        self.batches, self.ranks = batches, ranks

    def __iter__(self) -> Iterator[list[int]]:
        return (batch[self.ranks.shard(len(batch))] for batch in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def to_device_ahead(
    batches: Iterable[tuple[torch.Tensor, ...]], device: torch.device
) -> Iterator[tuple[torch.Tensor, ...]]:
    """The batches on `device`, each copied there while the one before it is being used.

    On a GPU the copy of batch i+1 (from pinned memory) runs on a side stream, overlapping the
    work queued for batch i instead of queueing behind it on the compute stream; the compute
    stream waits for each copy just before its batch is used. Elsewhere: a plain `.to(device)`.
    """
    if device.type != "cuda":
        for batch in batches:
            yield tuple(t.to(device) for t in batch)
        return
    copy_stream = torch.cuda.Stream(device)
    compute_stream = torch.cuda.current_stream(device)

    def issue(batch: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, ...] | None:
        if batch is None:
            return None
        copy_stream.wait_stream(compute_stream)  # memory freed by earlier batches' work is safe to reuse
        with torch.cuda.stream(copy_stream):
            return tuple(t.to(device, non_blocking=True) for t in batch)

    source = iter(batches)
    pending = issue(next(source, None))
    while pending is not None:
        compute_stream.wait_stream(copy_stream)
        for t in pending:
            t.record_stream(compute_stream)  # allocated on the side stream, used on the compute stream
        current, pending = pending, issue(next(source, None))
        yield current


def device_batches(
    imageset: ImageSet | ShardedImageSet, batch_size: int, device: torch.device, *, shuffle: bool = False,
    seed: int = 0, ranks: Ranks | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`make_loader`'s batches on `device`, the way every loop that feeds a model gets them: gathered into
    pinned memory when `device` is a GPU, each copied there ahead of its use (`to_device_ahead`); with
    `ranks`, this rank's shard of each. Sharded images: the same batches (same order), read and decoded by
    `promptcil.data.shards`."""
    if isinstance(imageset, ShardedImageSet):
        yield from sharded_batches(
            imageset, batch_indices(len(imageset), batch_size, shuffle=shuffle, seed=seed, ranks=ranks), device)
        return
    loader = make_loader(imageset, batch_size, shuffle=shuffle, seed=seed, pin_memory=device.type == "cuda",
                         ranks=ranks)
    yield from to_device_ahead(loader, device)


class _BatchGather(Dataset):
    """A whole batch per index list: one index_select per tensor into the batch's own memory.

    Pinned output comes from PyTorch's pinned-memory cache, which hands the same warm blocks
    back batch after batch, so a batch costs one copy. DataLoader's own pin_memory gathers into
    fresh pageable memory first, faulting in every page, then copies again to pin: for 256 images
    of 224 px on 2 CPU cores, 35 ms for that gather against 3 ms for a copy into a reused buffer.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, pin_memory: bool) -> None:
        self.images, self.labels, self.pin_memory = images, labels, pin_memory

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.int64)
        return self._gather(self.images, index), self._gather(self.labels, index)

    def _gather(self, tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        out = torch.empty((len(index), *tensor.shape[1:]), dtype=tensor.dtype, pin_memory=self.pin_memory)
        return torch.index_select(tensor, 0, index, out=out)


class DevicePreprocess(nn.Module):
    """uint8 batch -> normalised float batch at the model's input size, on the batch's device.

    Greyscale becomes 3 channels by repetition when the model expects RGB; images
    are resized (bilinear, antialiased only when shrinking) only when their size
    differs from the model's; mean/std are the model's own (timm `pretrained_cfg`).

    Args:
        img_size: model input size, an int for square inputs or (height, width).
        mean: per-channel mean in 0..1 (one value, or one per model channel).
        std: per-channel std in 0..1, same length as `mean`.
        in_chans: channels the model expects (1 or 3).
    """

    def __init__(
        self, img_size: int | tuple[int, int], mean: Sequence[float], std: Sequence[float], in_chans: int = 3
    ) -> None:
        super().__init__()
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        if len(mean) != len(std) or len(mean) not in (1, in_chans):
            raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} need 1 or {in_chans} values each")
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.in_chans = in_chans
        self.images_seen = 0  # images through the model's forward: a stage's record can say what it computed
        # Not persistent: they are derived from the model config, not learned state.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    @classmethod
    def from_model(cls, model: nn.Module) -> DevicePreprocess:
        """Match a timm ViT: its pretrained_cfg mean/std and the size/channels its patch embedding was built for.

        The model's `img_size` is read from `patch_embed`, not from pretrained_cfg,
        which keeps the hub resolution (224) when a model is created at another size.
        A single-channel model keeps the average of an RGB mean/std.
        """
        from timm.data import resolve_model_data_config

        data_cfg = resolve_model_data_config(model)
        in_chans = model.patch_embed.proj.in_channels
        mean, std = list(data_cfg["mean"]), list(data_cfg["std"])
        if in_chans == 1 and len(mean) == 3:
            mean, std = [sum(mean) / 3], [sum(std) / 3]
        return cls(tuple(model.patch_embed.img_size), mean, std, in_chans)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected (N, C, H, W) uint8 images, got {tuple(images.shape)} {images.dtype}")
        channels = images.shape[1]
        self.images_seen += images.shape[0]
        if channels != self.in_chans and not (channels == 1 and self.in_chans == 3):
            raise ValueError(f"{channels}-channel images cannot feed a {self.in_chans}-channel model")
        x = images.float().div_(255.0)
        height, width = x.shape[-2:]
        if (height, width) != self.img_size:
            shrinking = height > self.img_size[0] or width > self.img_size[1]
            x = F.interpolate(x, size=self.img_size, mode="bilinear", align_corners=False, antialias=shrinking)
        if channels != self.in_chans:
            x = x.expand(-1, self.in_chans, -1, -1)
        mean = self.mean.to(x.device, non_blocking=True)
        std = self.std.to(x.device, non_blocking=True)
        return (x - mean) / std
