"""prompt_init: the method's initial prompt from params (`init.name`), using only task 0's classes
(the data available before any training)."""

from __future__ import annotations

from promptcil.artifacts import ArtifactKind, load_tensors, save_tensors, write_json
from promptcil.config import Params
from promptcil.data import read_task_split
from promptcil.entry import stage_main
from promptcil.init import initialise
from promptcil.model import build_model
from promptcil.plots import layer_affinity_png
from promptcil.workspace import Workspace


def run(params: Params, workspace: Workspace, *, progress: bool = True) -> dict:
    p = workspace.localise(params)
    out = workspace.out("prompt_init")
    base = list(read_task_split(workspace.of("prepare")).task_classes(0))
    protos, _ = load_tensors(workspace.of("prototypes") / "prototypes.safetensors", kind=ArtifactKind.PROTOTYPES)
    features, _ = load_tensors(workspace.of("features") / "features.safetensors", kind=ArtifactKind.FEATURES)
    stats = {
        "class_features": protos["class_features"][base],
        "block_class_tokens": protos["block_class_tokens"][:, base],
        "block_token_sample": features["block_token_sample"],  # task 0's images only
        "layer_affinity": protos["layer_affinity"],
    }
    method = build_model(p, workspace.of("pretrain")).method
    facts = method.fit_to_data(stats, seed=p.train.seed)  # SHIP: semantic levels, attribute prototypes
    initialise(method, stats, p.init, seed=p.train.seed)
    write_json(out / "method.json", {"method": p.method.name, **facts})
    layer_affinity_png(protos["layer_affinity"].numpy(), out / "layer_affinity.png", facts.get("anchors"))
    save_tensors(out / "prompt.safetensors", method.state_dict(), kind=ArtifactKind.PROMPT_INIT,
                 metadata={"init": p.init.name, "method": p.method.name})
    return {"init": p.init.name, **facts}


if __name__ == "__main__":
    stage_main(run, __doc__)
