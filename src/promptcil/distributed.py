"""Several processes on one stage (torchrun): one per GPU, gloo on a CPU; one writer.

`torchrun --nproc-per-node=N -m stages.<stage> [--root DIR]` (any number of nodes: torchrun's
rendezvous) runs a stage on N processes in one workspace and writes exactly what one process writes:
rank 0 writes, the others compute. Every global batch (the seeded order one process would see) is split
into contiguous per-rank shards; each rank weights its loss by its share of the batch and the gradients
are summed across ranks (pretraining's backbone through DistributedDataParallel, which overlaps that with
the backward pass), so the step is the one-process step up to the order of float additions. The
heads' running sums (ridge Gram matrix, class means, class statistics) are summed across ranks before a
task ends, and features and predictions are gathered, in data order.

`train.nproc` > 1 makes `python -m stages.<stage>` (dvc.yaml's command) and the Prefect flow launch the
stage under torchrun themselves; a single process stays the default and never touches torch.distributed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from promptcil.errors import PromptcilError

if TYPE_CHECKING:
    from promptcil.data.sources import ImageSet

DISTRIBUTED_STAGES = ("pretrain", "features", "train", "evaluate")
LAUNCHED = "PROMPTCIL_LAUNCHED"  # set in the processes `launch` starts: they must not launch again


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def writer(self) -> bool:
        """Only rank 0 writes artifacts."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def shard(self, count: int) -> slice:
        """This rank's contiguous part of `count` rows (sizes differ by at most one, rank 0 first)."""
        base, extra = divmod(count, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))


    def shard_sizes(self, count: int) -> list[int]:
        """How many of `count` rows each rank gets (`shard`), rank 0 first."""
        return [len(range(count)[Ranks(r, self.world).shard(count)]) for r in range(self.world)]


SINGLE = Ranks()


def setup(device_name: str) -> tuple[Ranks, torch.device]:
    """The ranks torchrun started (WORLD_SIZE, RANK, LOCAL_RANK), the process group joined (nccl on CUDA, gloo
    on a CPU), and this rank's device (cuda:LOCAL_RANK). Outside torchrun: one process, `device_name`."""
    from promptcil.runtime import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world == 1:
        return SINGLE, device
    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
    return ranks, device


def current() -> Ranks:
    """The ranks of the process group this process joined (one process when none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shard_of(data: ImageSet) -> tuple[ImageSet, Ranks]:
    """Under torchrun (a process group joined), this rank's contiguous part of `data`; else all of it."""
    ranks = current()
    if not ranks.distributed:
        return data, ranks
    rows = ranks.shard(len(data))
    return data.take(rows), ranks


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


def all_reduce_sum_(tensors: list[torch.Tensor], ranks: Ranks) -> None:
    """Sum each tensor across ranks, in place."""
    if ranks.distributed:
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def all_reduce_gradients(parameters: list[torch.nn.Parameter], ranks: Ranks, device: torch.device, *,
                         every_rank_has_rows: bool = True) -> None:
    """Sum the gradients across ranks (each rank's loss was weighted by its share of the global batch). A
    parameter no rank reached keeps `grad = None`, as in one process (the optimizer skips it: no weight
    decay, no moment update); one that only some ranks reached gets zeros on the others. When every rank
    had rows, every rank ran the same graph, so the ranks agree on which gradients exist without asking
    (asking costs a host sync per step); they ask only when a short last batch left a rank empty."""
    if not ranks.distributed:
        return
    if every_rank_has_rows:
        joined = [p for p in parameters if p.grad is not None]
    else:
        reached = torch.tensor([p.grad is not None for p in parameters], dtype=torch.int32, device=device)
        dist.all_reduce(reached, op=dist.ReduceOp.MAX)
        joined = [p for p, any_rank in zip(parameters, reached.tolist()) if any_rank]
    for parameter in joined:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    grads = [p.grad for p in joined]
    if len({g.dtype for g in grads}) != 1:
        all_reduce_sum_(grads, ranks)
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # one collective, not one per parameter (a backbone: ~150)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    for grad, summed in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(summed.view_as(grad))


def broadcast_flag(value: bool, ranks: Ranks, device: torch.device) -> bool:
    """Rank 0's `value` on every rank."""
    if not ranks.distributed:
        return value
    flag = torch.tensor([int(value)], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def gather_rows(local: torch.Tensor, total: int, ranks: Ranks, device: torch.device) -> torch.Tensor:
    """Every rank's shard (`Ranks.shard` of `total` rows, along dim 0) concatenated in rank order, on every
    rank and on `local`'s device. Shards differ in size by at most one row: padded for the collective."""
    if not ranks.distributed:
        return local
    padded, sizes = _padded(local, total, ranks, device)
    pieces = [torch.empty_like(padded) for _ in range(ranks.world)]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[:size] for piece, size in zip(pieces, sizes)]).to(local.device)


def gather_rows_to_writer(local: torch.Tensor, total: int, ranks: Ranks, device: torch.device) -> torch.Tensor | None:
    """`gather_rows` for what only rank 0 keeps: the rows in rank order on rank 0 (on `local`'s device), None on
    the other ranks, which neither receive nor hold the whole."""
    if not ranks.distributed:
        return local
    padded, sizes = _padded(local, total, ranks, device)
    pieces = [torch.empty_like(padded) for _ in range(ranks.world)] if ranks.writer else None
    dist.gather(padded, pieces, dst=0)
    if pieces is None:
        return None
    return torch.cat([piece[:size] for piece, size in zip(pieces, sizes)]).to(local.device)


def _padded(local: torch.Tensor, total: int, ranks: Ranks, device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """This rank's shard on `device`, padded to the longest shard (collectives move equal shapes), and every
    rank's shard size."""
    sizes = ranks.shard_sizes(total)
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: len(local)] = local.to(device)
    return padded, sizes


def torchrun_command(module: str, nproc: int, args: list[str]) -> list[str]:
    """`python -m torch.distributed.run --nproc-per-node=N -m MODULE ARGS` (torchrun, with this interpreter)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", module, *args]


def launch(stage: str, root: Path, params_file: Path | None, nproc: int) -> None:
    """Run `stages.<stage>` on `nproc` processes under torchrun. A rank that fails stops the others (torchrun
    does); its one `error:` line is what this raises (StageFailed), not torchrun's report."""
    args = ["--root", str(root), "--no-progress"] + (["--params", str(params_file)] if params_file else [])
    env = os.environ | {LAUNCHED: "1", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1)
                                                                                       // nproc)))}
    done = subprocess.run(torchrun_command(f"stages.{stage}", nproc, args), env=env, stderr=subprocess.PIPE,
                          text=True)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        codes = [int(code) for code in re.findall(r"exitcode\s*:\s*(\d+)", done.stderr)]
        failed = StageFailed(errors[0].removeprefix("error: ") if errors else
                             f"stages.{stage} failed on {nproc} processes: "
                             + (done.stderr.strip().splitlines() or ["no output"])[-1])
        failed.exit_code = next((code for code in codes if code > 1), 1)
        raise failed


class StageFailed(PromptcilError):
    """A stage launched on several processes failed; the message is the failing rank's one line, the exit
    code that rank's (promptcil.errors' table)."""


def samples_per_rank(count: int, batch_size: int, world: int) -> list[int]:
    """How many of `count` images each rank sees per epoch, every global batch split as `Ranks.shard` does."""
    sizes = [0] * world
    for start in range(0, count, batch_size):
        batch = min(batch_size, count - start)
        for rank in range(world):
            rows = Ranks(rank, world).shard(batch)
            sizes[rank] += rows.stop - rows.start
    return sizes
