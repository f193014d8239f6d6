"""Prompt ensembling (Lester et al. 2021): K prompts of one method side by side in one batched forward.

The batch is embedded once and repeated K times, member-major (rows k*B .. k*B+B-1
belong to member k); each member edits only its own rows: its `before_block` gets
its chunk of the sequence, its hooks get its chunk of the hooked module's output
(hooks edit in place, so a chunk view suffices). Features come out as (K*B, D),
and `EnsembleHead` gives each member its own head and averages their logits.
Members are ordinary methods, so each keeps its own init, training and (APT)
merging; the prompt-pool method, whose forward runs a query pass of its own,
is not ensembled.
"""

from __future__ import annotations

import torch
from torch import nn

from promptcil.backbone import embed_tokens
from promptcil.prompts.base import OutputHook, PromptMethod


class PromptEnsemble(PromptMethod):
    def __init__(self, members: list[PromptMethod]) -> None:
        """
        Args:
            members: K methods of the same kind on the same backbone (not attached themselves).
        """
        if len(members) < 2 or len({type(m) for m in members}) != 1:
            raise ValueError("method.ensemble: needs at least 2 members of one method")
        if type(members[0]).forward is not PromptMethod.forward:
            raise ValueError(f"method.ensemble: '{members[0].method_name}' cannot be ensembled (only apt and vpt)")
        super().__init__(members[0].backbone)
        self.members = nn.ModuleList(members)
        self.method_name = members[0].method_name
        self.init_std = members[0].init_std

    @property
    def size(self) -> int:
        return len(self.members)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return embed_tokens(self.backbone, images).repeat(self.size, 1, 1)

    def before_block(self, index: int, tokens: torch.Tensor) -> torch.Tensor:
        chunks = tokens.chunk(self.size)
        return torch.cat([member.before_block(index, chunk) for member, chunk in zip(self.members, chunks)])

    def hooks(self) -> list[tuple[nn.Module, OutputHook]]:
        per_member = [member.hooks() for member in self.members]
        return [
            (module, self._split_hook([hooks[i][1] for hooks in per_member]))
            for i, (module, _) in enumerate(per_member[0])
        ]

    def _split_hook(self, member_hooks: list[OutputHook]) -> OutputHook:
        def apply_per_member(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
            rows, rest = divmod(output.shape[0], self.size)
            if rest:  # the ensemble's own forward repeats the batch K times; anything else is a stray call
                raise RuntimeError(f"a prompt ensemble of {self.size} saw a batch of {output.shape[0]} rows: "
                                   "its hooks only run inside its own forward (detach it before other use)")
            # each member's hook gets its own rows as a tensor of their own (a hook may edit them in place
            # outside autograd and return a new node for it, as APT's does: on views of one shared output
            # one member's edit would invalidate another's result) and what it returns is used
            return torch.cat([hook(module, inputs, output[k * rows : (k + 1) * rows].clone())
                              for k, hook in enumerate(member_hooks)])

        return apply_per_member

    def end_task(self) -> None:
        for member in self.members:
            member.end_task()

    def prompt_parameters(self) -> list[nn.Parameter]:
        return [p for member in self.members for p in member.prompt_parameters()]
