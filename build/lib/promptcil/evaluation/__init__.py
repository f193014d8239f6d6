"""Evaluation, one job per module: the accuracy matrix (accuracy.py), the CIL metrics from it
(metrics.py), DePT's base/new (base_new.py), the joint upper bound (joint.py) and cost (cost.py)."""

from promptcil.evaluation.accuracy import accuracy_matrix, accuracy_row, features_of, predict
from promptcil.evaluation.base_new import base_new, nearest_prototype_accuracy, next_task_class_mean_accuracy
from promptcil.evaluation.cost import count_parameters, gflops_per_image
from promptcil.evaluation.joint import joint_upper_bound
from promptcil.evaluation.metrics import accuracy, base_new_summary, harmonic_mean, summarize

__all__ = ["accuracy", "accuracy_matrix", "accuracy_row", "base_new", "base_new_summary", "count_parameters",
           "features_of", "gflops_per_image", "harmonic_mean", "joint_upper_bound", "nearest_prototype_accuracy",
           "next_task_class_mean_accuracy", "predict", "summarize"]
