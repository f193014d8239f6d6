"""The registered model: an MLflow pyfunc logged as code (no pickle), which rebuilds the frozen
backbone from its reference and loads the prompt + head. Input: uint8 images (N, C, H, W);
output: class names.

This module is the contract of a registered version: `version_artifacts` names what one carries,
`load_version_model` rebuilds the model from it (the pyfunc and the retrain flow both do).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import torch

from promptcil.artifacts import manifest_path
from promptcil.config import Params, load_params


def version_artifacts(
    params: Path, backbone: Path, task_state: Path, tasks: Path, eval_set: Path, metrics: Path
) -> dict[str, str]:
    """The files a registered version carries, by the keys `load_context` and the retrain flow read.

    The held-out test images (never training data) travel too, so a retrain evaluates on every
    class seen without the pipeline's folders; safetensors files travel with their manifests.
    """
    files = {"params": params, "backbone": backbone, "task_state": task_state, "tasks": tasks,
             "eval_set": eval_set, "metrics": metrics}
    artifacts = {key: str(path) for key, path in files.items()}
    for key in ("task_state", "eval_set"):
        artifacts[f"{key}_manifest"] = str(manifest_path(files[key]))
    return artifacts


def load_version_model(params: Params, backbone_dir: Path, task_state: Path):
    """The IncrementalModel a version describes: its backbone, method and head, with its prompt + head."""
    from promptcil.backbone import load_recorded_backbone
    from promptcil.model import IncrementalModel
    from promptcil.training import load_task_state

    backbone = load_recorded_backbone(params.backbone, backbone_dir, seed=params.train.seed)
    model = IncrementalModel.from_params(params, backbone)
    load_task_state(model, task_state)
    return model


class PromptcilModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        params = load_params(context.artifacts["params"])
        self.model = load_version_model(params, Path(context.artifacts["backbone"]),
                                        Path(context.artifacts["task_state"]))
        self.model.eval()
        self.class_names = json.loads(Path(context.artifacts["tasks"]).read_text())["class_names"]

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> list[str]:
        images = torch.as_tensor(np.asarray(model_input, dtype=np.uint8))
        if images.ndim == 3:  # (N, H, W) grey
            images = images[:, None]
        return [self.class_names[i] for i in self.model.predict(images).tolist()]


mlflow.models.set_model(PromptcilModel())
