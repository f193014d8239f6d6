"""prompt_init: the method's initial prompt from params (`init.name`), using only task 0's classes
(the data available before any training)."""

from __future__ import annotations

from pathlib import Path

import torch

from promptcil.artifacts import ArtifactKind, load_tensors, save_tensors, write_json
from promptcil.config import Params
from promptcil.data import read_task_split
from promptcil.entry import stage_main
from promptcil.features import TOKEN_SAMPLE_FILE
from promptcil.init import initialise
from promptcil.model import build_model
from promptcil.plots import layer_affinity_png
from promptcil.workspace import Workspace


def run(params: Params, workspace: Workspace, *, progress: bool = True) -> dict:
    p = workspace.localise(params)
    out = workspace.out("prompt_init")
    base = list(read_task_split(workspace.of("prepare")).task_classes(0))
    protos, _ = load_tensors(workspace.of("prototypes") / "prototypes.safetensors", kind=ArtifactKind.PROTOTYPES)
    stats = TokenSampleOnDemand(workspace.of("features") / TOKEN_SAMPLE_FILE, {
        "class_features": protos["class_features"][base],
        "block_class_tokens": protos["block_class_tokens"][:, base],
        "layer_affinity": protos["layer_affinity"],
    })
    method = build_model(p, workspace.of("pretrain")).method
    facts = method.fit_to_data(stats, seed=p.train.seed)  # SHIP: semantic levels, attribute prototypes
    initialise(method, stats, p.init, seed=p.train.seed)
    write_json(out / "method.json", {"method": p.method.name, **facts})
    layer_affinity_png(protos["layer_affinity"].numpy(), out / "layer_affinity.png", facts.get("anchors"))
    save_tensors(out / "prompt.safetensors", method.state_dict(), kind=ArtifactKind.PROMPT_INIT,
                 metadata={"init": p.init.name, "method": p.method.name})
    return {"init": p.init.name, **facts}


class TokenSampleOnDemand(dict):
    """The initialisers' statistics, with "block_token_sample" (task 0's images only) read from `path` the first
    time an initialiser or method asks for it: random and class-prototype inits never load its gigabyte."""

    def __init__(self, path: Path, stats: dict[str, torch.Tensor]) -> None:
        super().__init__(stats)
        self.path = path

    def __missing__(self, key: str) -> torch.Tensor:
        if key != "block_token_sample":
            raise KeyError(key)
        self[key] = load_tensors(self.path, kind=ArtifactKind.TOKEN_SAMPLE)[0][key]
        return self[key]


if __name__ == "__main__":
    stage_main(run, __doc__)
