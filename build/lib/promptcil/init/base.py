"""The initialisers' registry and the one entry point, `initialise`.

Each initialiser takes the freshly built method (holding its seeded random init), the statistics of
task 0's data that the features and prototypes stages computed once, the `init` section and a seed.
Token initialisers fill the slots a method declares with `token_slots()` (VPT: N tokens per prompted
block; APT: one token per block, turned into its key/value; L2P: the pool, entering block 0) and hand
them over with `set_slot_tokens()`, so one initialiser serves every method.

Stats: "class_features" (C, D) and "block_class_tokens" (depth, C, D) are task 0's class means;
"block_token_sample" (depth, images, patches, D) holds every patch token entering every block for a
sample of task 0's images.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from pydantic import BaseModel

from promptcil.prompts import PromptMethod
from promptcil.prompts.ensemble import PromptEnsemble
from promptcil.registry import Registry

Initialiser = Callable[[PromptMethod, dict[str, torch.Tensor], Any, int], None]
INITIALISERS: Registry[Initialiser] = Registry("initialiser", "promptcil.init")


def register_initialiser(name: str, config: type[BaseModel] | None = None) -> Callable[[Initialiser], Initialiser]:
    """Make a function selectable as `init.name`, with its settings `config` as `init.<name>`."""
    return INITIALISERS.register(name, config)


def initialise(method: PromptMethod, stats: dict[str, torch.Tensor], cfg: Any, seed: int) -> None:
    """Apply `cfg.name`; an ensemble's members each get their own seed (seed + member index)."""
    if isinstance(method, PromptEnsemble):
        for index, member in enumerate(method.members):
            initialise(member, stats, cfg, seed + index)
        return
    INITIALISERS[cfg.name].obj(method, stats, cfg, seed)
