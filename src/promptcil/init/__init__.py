"""Prompt initialisers, selected by `init.name` in params.yaml.

Each takes the freshly built method (already holding its seeded random init)
and the statistics of task 0's classes computed once by the features stage.
"""

from __future__ import annotations

from typing import Callable

import torch

from promptcil.prompts import PromptMethod

Initialiser = Callable[[PromptMethod, dict[str, torch.Tensor]], None]
INITIALISERS: dict[str, Initialiser] = {}


def register_initialiser(name: str) -> Callable[[Initialiser], Initialiser]:
    def add(fn: Initialiser) -> Initialiser:
        INITIALISERS[name] = fn
        return fn

    return add


@register_initialiser("random")
def random_init(method: PromptMethod, stats: dict[str, torch.Tensor]) -> None:
    """Keep the method's own trunc-normal init (Lester's random baseline; VPT's usual init)."""


@register_initialiser("class_prototype")
def class_prototype_init(method: PromptMethod, stats: dict[str, torch.Tensor]) -> None:
    """Lester's class-label init, for vision: prompt slots from class prototypes (see each method)."""
    method.init_from_class_tokens(stats["block_class_tokens"], stats["class_features"])


def initialise(name: str, method: PromptMethod, stats: dict[str, torch.Tensor]) -> None:
    INITIALISERS[name](method, stats)
