"""The timed steps on one model: the trainer's training step, the evaluation's inference, GFLOPs, graph counts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from promptcil.config import TrainConfig
from promptcil.evaluation import gflops_per_image
from promptcil.model import IncrementalModel
from promptcil.runtime import autocast_for
from promptcil.training import make_optimizer
from promptcil.training import train_step as library_train_step

from harness.inputs import FIRST_CLASS, Batches, Run
from harness.timing import measure


def train_rate(run: Run, model: IncrementalModel, batches: Batches, scratch: Path) -> dict[str, Any]:
    """The rate of train_step's step."""
    return measure(run, train_step(run, model, batches, scratch), run.batch_size)


def train_step(run: Run, model: IncrementalModel, batches: Batches, scratch: Path) -> Callable[[int], None]:
    """Step i: the trainer's own step on batch i of task 1 (labels FIRST_CLASS.., earlier logits masked)."""
    model.to(run.device)
    optimizer = make_optimizer(TrainConfig(batch_size=run.batch_size), model.trainable_parameters())
    model.method.attach()
    model.train()

    def step(i: int) -> None:
        library_train_step(model, model.head, *batches.pick(i), FIRST_CLASS, optimizer, run.device)

    return step


def inference_rate(run: Run, model: IncrementalModel, batches: Batches) -> dict[str, Any]:
    """The evaluation's path: IncrementalModel.predict (uint8 in, labels out) under the library's autocast."""
    model.method.attach()
    model.eval()

    def step(i: int) -> None:
        with autocast_for(run.device):
            model.predict(batches.pick(i)[0])

    return measure(run, step, run.batch_size)


def gflops(model: IncrementalModel, batches: Batches) -> float:
    """Forward GFLOPs per image as the evaluate stage counts them (the model on uint8 images)."""
    model.method.attach()
    model.eval()
    return gflops_per_image(model, batches.images[0][:2])


def dynamo_graphs() -> int:
    """Graphs torch.compile has compiled so far in this process (graph breaks add graphs)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
