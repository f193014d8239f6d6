"""First-session adaptation (RanPAC, APER): with an analytic head (prototype, ridge), the prompt trains on
the first task only, through a temporary linear head, then stays fixed, so the analytic head sees
features that do not move across tasks and stays exact."""

from __future__ import annotations

from typing import Any

import torch

from promptcil.heads import Head
from promptcil.heads.ensemble import EnsembleHead
from promptcil.heads.linear import LinearHead
from promptcil.training.step import shuffle_seed


def first_session_adapter(model: Any, task: int, num_classes: int, seed: int,
                          state: dict[str, torch.Tensor] | None = None) -> Head | None:
    """The temporary head for task 0 of a prompted model with an analytic head (None otherwise); `state`:
    a checkpoint's adapter, mid-task."""
    if model.head.trainable or task != 0 or not list(model.method.parameters()):
        return None
    # one linear head per prompt-ensemble member, like the model's own head: each member adapts its prompt
    members = len(model.head.heads) if isinstance(model.head, EnsembleHead) else 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(shuffle_seed(seed, task, -2))
        linear = [LinearHead(model.method.embed_dim) for _ in range(members)]
        for head in linear:
            head.add_classes(num_classes)
    adapter = linear[0] if members == 1 else EnsembleHead(linear)
    if state:
        adapter.load_grown_state(state)
    return adapter
