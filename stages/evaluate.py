"""evaluate: the accuracy matrix over tasks, A_last, A_avg, forgetting, the newest task's accuracy and
base/next-task/HM after each task (DePT's protocol mapped to CIL), the joint upper bound (the same head
fitted on all classes at once), GFLOPs and parameters, plus DVC plots (accuracy matrix as a table,
accuracy after each task)."""

from __future__ import annotations

import time

from promptcil.artifacts import read_json, write_json
from promptcil.config import Params
from promptcil.data import read_image_set, read_task_split
from promptcil.distributed import barrier, setup
from promptcil.entry import stage_main
from promptcil.evaluation import (
    accuracy_matrix,
    base_new,
    count_parameters,
    gflops_per_image,
    joint_upper_bound,
    summarize,
)
from promptcil.model import build_model
from promptcil.plots import write_accuracy_plots
from promptcil.training import load_task_state, task_state_path
from promptcil.workspace import Workspace


def run(params: Params, workspace: Workspace, *, progress: bool = True) -> dict:
    p = workspace.localise(params)
    prepared, out = workspace.of("prepare"), workspace.out("evaluate")
    split = read_task_split(prepared)
    ranks, device = setup(p.train.device)  # torchrun: each rank predicts its shard, rank 0 writes
    model = build_model(p, workspace.of("pretrain"), device=device)  # every task state holds the whole prompt
    states = [task_state_path(workspace.of("train"), t) for t in range(split.num_tasks)]
    test, train = read_image_set(prepared, "test", p.data), read_image_set(prepared, "train", p.data)
    barrier(ranks)  # every rank has loaded: the time below is the work, not the ranks' start-up skew
    started = time.perf_counter()
    matrix, counts = accuracy_matrix(model, states, test, split, p.eval.batch_size, device)
    metrics = summarize(matrix, counts)
    phases = {"accuracy_matrix": time.perf_counter() - started}  # each phase ends on the host: no sync needed
    metrics |= base_new(model, states, metrics["accuracy_after_task"], train, test, split, p.eval.batch_size, device)
    phases["base_new"] = time.perf_counter() - started - sum(phases.values())
    load_task_state(model, states[-1])
    joint = joint_upper_bound(model, p.head, p.train, train, test, p.eval.batch_size, device)
    metrics |= {"A_joint": joint, "A_last_vs_joint": metrics["A_last"] / joint if joint > 0 else None}
    seconds = time.perf_counter() - started  # every task state over the test set, and the joint bound
    phases["joint_bound"] = seconds - sum(phases.values())
    forwarded = model.preprocess.images_seen  # this rank's images through the model in that time
    model.eval()
    example = test.first(8).to(device)
    model.method.detach()  # the plain backbone's cost, for the ratio
    plain_gflops = gflops_per_image(lambda x: model.backbone.forward_features(model.preprocess(x)), example)
    model.method.attach()
    gflops = gflops_per_image(model, example)
    metrics |= {
        "method": p.method.name,
        "head": p.head.name,
        "gflops_per_image": gflops,
        "gflops_vs_plain_backbone": gflops / plain_gflops,
        "trainable_params": count_parameters(model.method) + count_parameters(model.head, trainable_only=False),
        "prompt_params": count_parameters(model.method),
        "test_samples_per_task": counts,
    }
    if ranks.writer:
        write_json(out / "metrics.json", metrics)
        write_accuracy_plots(metrics, out)
        write_json(out / "evaluate.json", {"world_size": ranks.world, "seconds": seconds, "phase_seconds": phases,
                                           "images_forwarded": forwarded,
                                           "test_samples_per_rank": ranks.shard_sizes(len(test))})
    return metrics


def result(workspace: Workspace) -> dict:
    """What `run` returned, read back from its record (after a run on several processes)."""
    return read_json(workspace.out("evaluate") / "metrics.json")


if __name__ == "__main__":
    stage_main(run, __doc__)
