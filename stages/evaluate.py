"""evaluate: the accuracy matrix over tasks, A_last, A_avg, forgetting, the newest task's accuracy and
base/next-task/HM after each task (DePT's protocol mapped to CIL), the joint upper bound (the same head
fitted on all classes at once), GFLOPs and parameters, plus DVC plots (accuracy matrix as a table,
accuracy after each task)."""

from __future__ import annotations

import sys
from pathlib import Path

from promptcil.artifacts import write_json
from promptcil.evaluation import accuracy_matrix, base_new, joint_upper_bound
from promptcil.metrics import count_parameters, gflops_per_image, summarize
from promptcil.plots import write_accuracy_plots
from promptcil.train import load_task_state, task_state_path

from stages.common import EVALUATE, TRAIN, device_for, image_set, params, run_stage, task_split
from stages.train import build_model


def evaluate(params_path: str | Path = "params.yaml", out: Path = EVALUATE, train_dir: Path = TRAIN) -> dict:
    p = params(params_path)
    split = task_split()
    device = device_for(p)
    model = build_model(p, device, init=False)  # every task state holds the whole prompt
    states = [task_state_path(train_dir, t) for t in range(split.num_tasks)]
    test = image_set("test")
    matrix, counts = accuracy_matrix(model, states, test, split, p.eval.batch_size, device)
    metrics = summarize(matrix, counts)
    train = image_set("train")
    metrics |= base_new(model, states, metrics["accuracy_after_task"], train, test, split,
                        p.eval.batch_size, device)
    load_task_state(model, states[-1])
    joint = joint_upper_bound(model, p.head, p.train, train, test, p.eval.batch_size, device)
    metrics |= {"A_joint": joint, "A_last_vs_joint": metrics["A_last"] / joint if joint > 0 else None}
    model.eval()
    example = test.images[:8].to(device)
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
    write_json(out / "metrics.json", metrics)
    write_accuracy_plots(metrics, out)
    return metrics


if __name__ == "__main__":
    run_stage(evaluate, *sys.argv[1:2])
