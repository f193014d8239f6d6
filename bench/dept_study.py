"""Issue 9's study: DePT's CAT head against the plain prototype head, for VPT-deep and APT, 3 seeds.

    python bench/dept_study.py                                  # digits on this CPU
    python bench/dept_study.py --protocol fashion-mnist-b4inc2 --protocol cross-fmnist-digits --data-root DIR

Rows: SimpleCIL (frozen features + class means: what the untouched features give, new included),
then per method:
- prototype: the prompt adapted on task 0 only (first-session adaptation), then class means;
- matching: the prompt trained on every task through the prototype (matching) head alone, i.e. the
  CAT head with lambda 0 for the loss and the fusion: DePT's "without DePT" baseline;
- cat: the CAT head with head.cat's defaults (lambda 0.7 for the loss and the fusion, logit scale
  100, the CAT head at 6.5 x train.lr); the prompt trains on every task;
- cat, lr x1: the same with the CAT head at train.lr (DePT's 6.5 multiplies an SGD learning rate;
  promptcil's default optimizer is Adam, whose steps do not shrink with small gradients);
- linear: the task-by-task linear head, for reference.
Columns add DePT's base/new protocol mapped to CIL, averaged over the tasks that have a next task:
base (accuracy on the classes seen so far), new (the next task's classes from class means of the
untrained model, among themselves) and their harmonic mean HM. Writes bench/results/dept-<date>.json
(per-task base/new/HM of every run) and .md.
"""

from __future__ import annotations

from study import Variant, study_cli

METHODS = {"VPT-deep": {"name": "vpt", "vpt": {"deep": True}}, "APT": {"name": "apt"}}
HEADS = {
    "prototype": {"name": "prototype"},
    "matching": {"name": "cat", "cat": {"loss_weight": 0.0, "fusion_weight": 0.0}},
    "cat": {"name": "cat"},
    "cat, lr x1": {"name": "cat", "cat": {"lr_scale": 1.0}},
    "linear": {"name": "linear"},
}


def variants() -> list[Variant]:
    return [Variant("frozen + prototype", {"method": {"name": "none"}, "head": {"name": "prototype"}})] + [
        Variant(f"{label} + {head}", {"method": method, "head": head_params})
        for label, method in METHODS.items()
        for head, head_params in HEADS.items()
    ]


if __name__ == "__main__":
    study_cli("dept", variants(), __doc__, columns={"base": "base_avg", "next task": "next_task_class_mean_avg", "HM": "HM_avg"})
