"""The registered model: an MLflow pyfunc logged as code (no pickle), which rebuilds the frozen
backbone from its reference and loads the prompt + head. Input: a batch of images, encoded or as
pixels; output: one class name per image.

This module is the contract of a registered version: `version_artifacts` names what one carries,
`load_version_model` rebuilds the model from it (the pyfunc and the retrain flow both do), and
`PromptcilModel.predict` says what a request may hold.

**The input: one input, `image`, in one of two forms per request.**

* Encoded files: PNG, JPEG, WebP or GIF, one per image, of any sizes — bytes in Python, base64 text
  in JSON. Over REST: `{"inputs": {"image": ["<base64 PNG or JPEG>", ...]}}`. They are decoded with
  torchvision (EXIF orientation applied, 16-bit scaled to 8 bits) to RGB, then to the model's
  channels: a grey model gets the ITU-R 601 luma, as `promptcil.incoming` computes it.
* Pixels: the whole batch as one uint8 array (N, C, H, W) or (N, H, W), C = 1 (grey) or 3 (RGB) —
  a numpy array in Python (`model.predict(images)`, as before), nested lists of integers 0..255 in
  JSON (`{"inputs": [[[[...]]]]}`, the logged input example's form).

The model resizes to its input size (images of different sizes are predicted size by size).

**Why the signature is `image: Tensor('object', (-1,))`.** MLflow enforces the signature before
`predict` runs, and no ordinary schema admits both forms (measured on MLflow 3.17): a column schema
(`ColSpec("binary", "image")`) rejects a bare 4-D array outright (it must become a DataFrame), so
`predict(images)` would break; over REST it base64-decodes a binary column for `dataframe_*`
payloads but not for `inputs`; and a failed enforcement answers with MLflow's multi-line message
quoting the request. A uint8 TensorSpec takes arrays only. A *named* object tensor of any length is
what MLflow maps a bare array onto (the one input) and passes on unchanged, whatever it holds, so
both forms arrive here and one place checks them: every bad request — float pixels, values outside
0..255, (N, H, W, C) layouts, other channel counts, an empty batch, bytes that are not an image,
invalid base64 — raises `BadRequest`, one line naming the problem, which `mlflow models serve`
answers with HTTP 400 (`{"error_code": "INVALID_PARAMETER_VALUE", "message": "<that line>", ...}`).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections import defaultdict
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from promptcil.artifacts import manifest_path
from promptcil.config.schema import Params, load_params

# ITU-R 601 luma, as promptcil.incoming turns RGB into a grey model's images
LUMA = np.array([0.299, 0.587, 0.114])


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


class BadRequest(MlflowException):
    """A request the model cannot take: one line naming the problem (and the image, `image_index`),
    an HTTP 400 from `mlflow models serve`.

    The scoring server rewrites an MlflowException's message to `Failed to predict data '<the whole
    request>'. \\nError: <message>`, two lines that echo the payload back; this one keeps its line.
    (This file is loaded as model code under another module name: match it by its attributes.)
    """

    def __init__(self, reason: str, image_index: int | None = None) -> None:
        self.reason, self.image_index = reason, image_index
        self._line = reason if image_index is None else f"image {image_index}: {reason}"
        super().__init__(self._line, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._line

    @message.setter
    def message(self, value: str) -> None:
        pass  # the scoring server's rewrite (above) is dropped


def image_batches(model_input, channels: int) -> list[tuple[list[int], torch.Tensor]]:
    """The request's images as groups of one size: (their positions, uint8 (n, C, H, W)), C being
    `channels` or 1 (the model repeats grey for RGB). Raises BadRequest for anything else."""
    images = _image_input(model_input)
    if len(images) == 0:
        raise BadRequest("empty batch: send at least one image")
    if images.dtype.kind in "US" or isinstance(_item(images.flat[0]), (str, bytes, bytearray)):
        if images.ndim != 1:
            raise BadRequest(f"encoded images: nested lists of shape {images.shape}; send one flat list")
        decoded = [_decode(_item(value), i, channels) for i, value in enumerate(images)]
        positions: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, image in enumerate(decoded):
            positions[tuple(image.shape)].append(i)
        return [(group, torch.stack([decoded[i] for i in group])) for group in positions.values()]
    pixels = _pixels(images, channels)
    return [(list(range(len(pixels))), pixels)]


def _image_input(model_input) -> np.ndarray:
    """The `image` input as an array: what MLflow hands over after enforcing the signature (a dict),
    or a DataFrame, array or list (the model called without the signature)."""
    if isinstance(model_input, dict):
        if "image" not in model_input:
            raise BadRequest(f"no 'image' input (got {sorted(map(str, model_input))})")
        model_input = model_input["image"]
    elif hasattr(model_input, "columns"):  # a pandas DataFrame
        if "image" not in model_input.columns:
            raise BadRequest(f"no 'image' column (got {list(map(str, model_input.columns))})")
        model_input = model_input["image"].to_numpy()
    if isinstance(model_input, np.ndarray):
        return model_input.reshape(1) if model_input.ndim == 0 else model_input
    if isinstance(model_input, (str, bytes, bytearray)):
        model_input = [model_input]
    array = np.empty(len(model_input), dtype=object)  # one entry per image, whatever each holds
    array[:] = list(model_input)
    return array


def _item(value):
    """One entry of an object array (a scalar wrapped in a 0-d array when JSON `instances` were sent)."""
    return value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value


def _decode(value, index: int, channels: int) -> torch.Tensor:
    """One encoded image (bytes, or their base64 text) as uint8 (C, H, W) in the model's channels."""
    from torchvision.io import ImageReadMode, decode_image

    if isinstance(value, str):
        text = "".join(value.split())
        if text.startswith("data:"):  # a data URL: data:image/png;base64,...
            text = text.partition(",")[2]
        try:
            value = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as err:
            raise BadRequest(f"invalid base64 ({err})", index) from None
    elif not isinstance(value, (bytes, bytearray)):
        raise BadRequest(f"a {type(value).__name__} among encoded images: send all images encoded "
                         "(base64 text in JSON, bytes in Python) or all as one pixel array", index)
    if not value:
        raise BadRequest("empty file", index)
    try:
        image = decode_image(torch.frombuffer(bytearray(value), dtype=torch.uint8), mode=ImageReadMode.RGB,
                             apply_exif_orientation=True)
    except RuntimeError as err:
        reason = re.sub(r"^[\w()]+, \S+:\d+, ", "", str(err).strip().splitlines()[0])  # torchvision's source location
        if reason.startswith("Unsupported image file"):
            raise BadRequest("cannot identify image file (PNG, JPEG, WebP or GIF expected)", index) from None
        raise BadRequest(f"cannot decode image: {reason}", index) from None
    if image.dtype == torch.uint16:  # 16-bit PNG: scaled, not clipped, as the data sources do
        image = (image.to(torch.float32) * (255.0 / 65535.0)).round().to(torch.uint8)
    return _in_channels(image[None], channels)[0]


def _pixels(images: np.ndarray, channels: int) -> torch.Tensor:
    """A pixel batch, (N, C, H, W) or (N, H, W) integers 0..255, as uint8 (N, C, H, W)."""
    if images.dtype == object:  # JSON's nested lists, as MLflow parsed them
        try:
            images = np.array(images.tolist())
        except ValueError:
            raise BadRequest("pixels: ragged nested lists: every image of one pixel array has the same "
                             "shape (send images of different sizes as PNG or JPEG)") from None
    shape = tuple(images.shape)
    if images.dtype.kind == "f":
        low, high = (float(images.min()), float(images.max())) if images.size else (0.0, 0.0)
        raise BadRequest(f"pixels: {images.dtype} values ({low:g}..{high:g}); send integers 0..255 "
                         "(uint8), floats in [0, 1] are not rescaled")
    if images.dtype.kind not in "iu":
        raise BadRequest(f"pixels: {images.dtype} values; send integers 0..255 (uint8), or encoded images")
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim != 4:
        raise BadRequest(f"pixels: shape {shape}; expected (N, C, H, W) or (N, H, W)")
    if images.shape[1] not in (1, 3):
        if images.shape[-1] in (1, 3):
            raise BadRequest(f"pixels: shape {shape} looks like (N, H, W, C); send channels first, (N, C, H, W)")
        raise BadRequest(f"pixels: {images.shape[1]} channels in shape {shape}; send 1 (grey) or 3 (RGB)")
    if images.size == 0:
        raise BadRequest(f"pixels: shape {shape} holds no pixels")
    low, high = int(images.min()), int(images.max())
    if low < 0 or high > 255:
        raise BadRequest(f"pixels: values {low}..{high}; expected 0..255 (uint8)")
    return _in_channels(torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)), channels)


def _in_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """RGB (N, 3, H, W) as a grey model's one channel (ITU-R 601 luma); anything else as it is."""
    if channels == 1 and images.shape[1] == 3:
        grey = (images.permute(0, 2, 3, 1).numpy() @ LUMA).round().clip(0, 255).astype(np.uint8)
        return torch.from_numpy(grey)[:, None]
    return images


def refuse_an_unapproved_champion(model_name: str, model_dir: Path) -> None:
    """Served from a registry (MLFLOW_TRACKING_URI set), a model that is its registered model's champion
    (`model_name`: its params' registry.model_name) loads only with an approval `promptcil review approve`
    recorded: an alias moved in the MLflow UI does not make a version serve. (A version served by its
    number is the operator's explicit choice.)"""
    import os

    import yaml

    mlmodel = model_dir / "MLmodel"
    model_id = yaml.safe_load(mlmodel.read_text()).get("model_id") if mlmodel.is_file() else None
    if model_id and os.environ.get("MLFLOW_TRACKING_URI"):
        from promptcil.tracking.review import refuse_unapproved_champion

        refuse_unapproved_champion(model_name, model_id)


class PromptcilModel(mlflow.pyfunc.PythonModel):
    # The signature (model_signature), not type hints, says what predict takes: no type hint describes "encoded
    # images or a pixel array", and without one MLflow warns on every import. Its switch for that (ChatModel's).
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        params = load_params(context.artifacts["params"])
        refuse_an_unapproved_champion(params.registry.model_name, Path(context.artifacts["params"]).parents[1])
        self.model = load_version_model(params, Path(context.artifacts["backbone"]),
                                        Path(context.artifacts["task_state"]))
        self.model.eval()
        self.batch_size = params.eval.batch_size
        self.class_names = json.loads(Path(context.artifacts["tasks"]).read_text())["class_names"]

    def predict(self, context, model_input, params: dict | None = None) -> list[str]:
        """One class name per image of `model_input` (its forms: the module's docstring)."""
        labels: dict[int, int] = {}
        for positions, images in image_batches(model_input, self.model.preprocess.in_chans):
            for start in range(0, len(positions), self.batch_size):
                predicted = self.model.predict(images[start:start + self.batch_size]).tolist()
                labels.update(zip(positions[start:start + self.batch_size], predicted, strict=True))
        return [self.class_names[labels[i]] for i in range(len(labels))]

mlflow.models.set_model(PromptcilModel())
