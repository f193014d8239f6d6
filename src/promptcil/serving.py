"""The registered model: an MLflow pyfunc logged as code (no pickle), which rebuilds the frozen
backbone from its reference and loads the prompt + head. Input: uint8 images (N, C, H, W);
output: class names."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import torch

from promptcil.config import load_params


class PromptcilModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from promptcil.backbone import load_backbone
        from promptcil.model import IncrementalModel
        from promptcil.train import load_task_state

        params = load_params(context.artifacts["params"])
        weights = Path(context.artifacts["backbone"]) / "weights.safetensors"
        backbone = load_backbone(params.backbone, weights=weights if weights.exists() else None, seed=params.train.seed)
        self.model = IncrementalModel.from_params(params, backbone)
        load_task_state(self.model, Path(context.artifacts["task_state"]))
        self.model.eval()
        self.class_names = json.loads(Path(context.artifacts["tasks"]).read_text())["class_names"]

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> list[str]:
        images = torch.as_tensor(np.asarray(model_input, dtype=np.uint8))
        if images.ndim == 3:  # (N, H, W) grey
            images = images[:, None]
        return [self.class_names[i] for i in self.model.predict(images).tolist()]


mlflow.models.set_model(PromptcilModel())
