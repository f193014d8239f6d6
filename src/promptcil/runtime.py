"""Where compute runs: the device from params and the matching autocast (bf16 on CUDA, fp32 on CPU), and how
per-image results come back to the host without the device waiting for it."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on CUDA; plain fp32 on CPU, where bf16 matmuls are slow and change results."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


class HostSink:
    """Device results to host memory batch by batch, the GPU never waiting on the host.

    Each batch is copied (non_blocking) into one of `slots` reused page-locked staging buffers and
    moved on the CPU into the final, ordinary tensors when its slot comes round again: the host
    then waits only for a copy queued `slots` batches ago, so the GPU keeps that many batches of
    work queued. Page-locking the whole result instead (N x depth x D floats) costs more than the
    copies themselves when N is large (docs/performance.md). On a CPU device it writes directly.
    """

    def __init__(self, rows: dict[str, tuple[int, ...]], count: int, batch_size: int, device: torch.device,
                 slots: int = 3) -> None:
        self.out = {name: torch.empty((count, *shape), dtype=torch.float32) for name, shape in rows.items()}
        self.cuda = device.type == "cuda"
        self.slots: list[dict] = []
        if self.cuda:
            self.slots = [{"staging": {name: torch.empty((batch_size, *shape), dtype=torch.float32, pin_memory=True)
                                       for name, shape in rows.items()}, "event": None, "rows": None}
                          for _ in range(slots)]
        self.batches = 0
        self.filled = 0  # rows handed over so far: the next batch's first row

    def put(self, **values: torch.Tensor) -> None:
        """The next batch's rows, one tensor per name given at construction."""
        start, n = self.filled, next(iter(values.values())).shape[0]
        self.filled += n
        if not self.cuda:
            for name, value in values.items():
                self.out[name][start:start + n].copy_(value)
            return
        slot = self.slots[self.batches % len(self.slots)]
        self._land(slot)
        for name, value in values.items():
            slot["staging"][name][:n].copy_(value, non_blocking=True)
        slot["event"], slot["rows"] = torch.cuda.Event(), (start, n)
        slot["event"].record()
        self.batches += 1

    def _land(self, slot: dict) -> None:
        if slot["event"] is None:
            return
        slot["event"].synchronize()  # this slot's copy, queued len(slots) batches ago
        start, n = slot["rows"]
        for name, staging in slot["staging"].items():
            self.out[name][start:start + n].copy_(staging[:n])
        slot["event"] = None

    def finish(self) -> dict[str, torch.Tensor]:
        for k in range(len(self.slots)):  # oldest first
            self._land(self.slots[(self.batches + k) % len(self.slots)])
        return self.out
