"""The registered model as a service: encoded images and pixel arrays through the Python pyfunc API, and
a real `mlflow models serve` answering base64 PNG/JPEG and refusing bad requests with one-line 400s.

The session's pipeline run is registered again into this module's own sqlite store; the server starts
once for the module.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import mlflow.tracking._model_registry.utils as registry_utils
import mlflow.tracking._tracking_service.utils as tracking_utils
import numpy as np
import pandas as pd
import pytest
import requests
import torch
from mlflow.exceptions import MlflowException
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, encode_jpeg, encode_png

from promptcil import tracking
from promptcil.config import RegistryConfig
from promptcil.data import ImageSet
from promptcil.evaluation import predict
from promptcil.serving import LUMA, image_batches

from conftest import NO_GATE, final_model

N = 8  # test images sent per request


def use_store(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Select `uri` the way users do (MLFLOW_TRACKING_URI + configure), undone by `monkeypatch`."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)  # mlflow.set_registry_uri exports it
    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    monkeypatch.setattr(registry_utils, "_registry_uri", registry_utils._registry_uri)
    tracking.configure()


@pytest.fixture(scope="module")
def registered(tmp_path_factory, logged_model) -> Iterator[dict]:
    """The pipeline run's model registered into a store of this module's own (MLFLOW_TRACKING_URI)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('serving') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_store(uri, monkeypatch)
        registry = RegistryConfig(model_name="promptcil-serving", gate=NO_GATE)
        version = tracking.register_version(registry, logged_model["uri"], logged_model["metrics"])["version"]
        yield {"tracking_uri": uri, "model_uri": f"models:/promptcil-serving/{version}"}


@pytest.fixture(scope="module")
def served(registered):
    return mlflow.pyfunc.load_model(registered["model_uri"])


def evaluate_stage_names(project, images: torch.Tensor) -> list[str]:
    """The class names the evaluate stage's model predicts for `images` (uint8, N x C x H x W)."""
    params, model, test = final_model(project)
    batch = ImageSet(images, torch.zeros(len(images), dtype=torch.int64), test.class_names)
    return [test.class_names[i] for i in predict(model, batch, params.eval.batch_size, torch.device("cpu")).tolist()]


@pytest.fixture(scope="module")
def reference(pipeline_project) -> dict:
    """N test images, as PNG and JPEG files, with the evaluate stage's class names for each.

    The JPEG's names are the evaluate stage's on the JPEG's own pixels (JPEG is lossy)."""
    project = pipeline_project["dir"]
    images = final_model(project)[2].images[:N]
    png = [bytes(encode_png(image).numpy()) for image in images]
    jpeg = [bytes(encode_jpeg(image, quality=90).numpy()) for image in images]
    jpeg_pixels = torch.stack([decode_image(torch.frombuffer(bytearray(f), dtype=torch.uint8),
                                            mode=ImageReadMode.GRAY if images.shape[1] == 1 else ImageReadMode.RGB)
                               for f in jpeg])
    return {"images": images, "png": png, "jpeg": jpeg, "names": evaluate_stage_names(project, images),
            "jpeg_names": evaluate_stage_names(project, jpeg_pixels)}


def b64(files: list[bytes]) -> list[str]:
    return [base64.b64encode(f).decode("ascii") for f in files]


# ---------------------------------------------------------------- the Python pyfunc API


def test_python_api_takes_encoded_images_and_pixel_arrays(served, reference):
    images, expected = reference["images"], reference["names"]
    assert served.predict({"image": np.array(reference["png"], dtype=object)}) == expected
    assert served.predict(pd.DataFrame({"image": reference["png"]})) == expected
    assert served.predict({"image": np.array(reference["jpeg"], dtype=object)}) == reference["jpeg_names"]
    assert served.predict(images.numpy()) == expected  # (N, C, H, W), as before
    assert served.predict(images.expand(-1, 3, -1, -1).numpy()) == expected  # grey as RGB
    if images.shape[1] == 1:
        assert served.predict(images[:, 0].numpy()) == expected  # (N, H, W)

    # files of two sizes in one request: predicted size by size, answered in request order
    larger = [bytes(encode_png(image.repeat_interleave(2, 1).repeat_interleave(2, 2)).numpy())
              for image in images]
    mixed = [files[i] for i in range(N) for files in (reference["png"], larger)][:N]
    alone = [served.predict({"image": np.array([f], dtype=object)})[0] for f in mixed]
    assert served.predict({"image": np.array(mixed, dtype=object)}) == alone

    with pytest.raises(MlflowException) as raised:
        served.predict(images.numpy() / 255.0)
    assert raised.value.message.startswith("pixels: float64 values (0..") and "\n" not in raised.value.message


def test_the_registered_version_shows_its_signature_and_example(pipeline_project, served):
    """As a reviewer sees the register stage's version, in the pipeline run's own store."""
    registration = pipeline_project["registration"]
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_store(pipeline_project["tracking_uri"], monkeypatch)
        info = mlflow.models.get_model_info(f"models:/{registration['model_name']}/{registration['version']}")
    signature = info.signature
    assert info.saved_input_example_info is not None
    assert signature.inputs.input_names() == ["image"]
    assert signature.inputs.inputs[0].type == np.dtype(object)
    assert signature.outputs.input_names() == ["class_name"]
    example = served.input_example  # the run's first two test images, as pixels (2, C, H, W) under `image`
    assert np.asarray(example["image"]).shape[0] == 2 and np.asarray(example["image"]).ndim == 4
    assert len(served.predict(example)) == 2


def test_rgb_becomes_a_grey_models_luma_and_16_bit_is_scaled():
    rgb = np.random.RandomState(0).randint(0, 256, (5, 7, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, "PNG")
    [(positions, grey)] = image_batches({"image": np.array([png.getvalue()], dtype=object)}, channels=1)
    luma = (rgb @ LUMA).round().clip(0, 255).astype(np.uint8)  # as promptcil.incoming computes it
    assert positions == [0] and grey.shape == (1, 1, 5, 7) and (grey[0, 0].numpy() == luma).all()
    [(_, colour)] = image_batches({"image": np.array([png.getvalue()], dtype=object)}, channels=3)
    assert (colour[0].permute(1, 2, 0).numpy() == rgb).all()

    deep = np.array([[0, 257, 65535]], dtype=np.uint16)
    png16 = io.BytesIO()
    Image.fromarray(deep).save(png16, "PNG")
    [(_, scaled)] = image_batches({"image": np.array([png16.getvalue()], dtype=object)}, channels=1)
    assert scaled.flatten().tolist() == [0, 1, 255]


# ---------------------------------------------------------------- over REST: mlflow models serve


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(registered, tmp_path_factory) -> Iterator[str]:
    """`mlflow models serve --env-manager local` on the registered version, on a free localhost port."""
    port, log = free_port(), tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["tracking_uri"],
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # it runs uvicorn
    env.pop("MLFLOW_REGISTRY_URI", None)
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", registered["model_uri"],
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"mlflow models serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow models serve did not answer /ping:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server and the uvicorn it started, in their own session
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def invoke(url: str, payload: dict) -> requests.Response:
    return requests.post(f"{url}/invocations", json=payload, timeout=60)


def test_rest_answers_base64_png_and_jpeg(server, reference):
    answer = invoke(server, {"inputs": {"image": b64(reference["png"])}})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"predictions": reference["names"]}

    answer = invoke(server, {"inputs": {"image": b64(reference["jpeg"])}})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"predictions": reference["jpeg_names"]}

    answer = invoke(server, {"inputs": reference["images"].tolist()})  # pixels as nested lists
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"predictions": reference["names"]}


BAD_REQUESTS = {
    # name: (the "image" input from the reference images, what the one line must say)
    "float pixels": (lambda images: (images / 255.0).tolist(), "pixels: float64 values (0.."),
    "NHWC": (lambda images: images.permute(0, 2, 3, 1).tolist(), "looks like (N, H, W, C)"),
    "undecodable bytes": (lambda images: b64([b"not an image"]), "image 0: cannot identify image file"),
    "empty list": (lambda images: [], "empty batch"),
    "invalid base64": (lambda images: ["%%% not base64"], "image 0: invalid base64"),
    "4 channels": (lambda images: images.expand(-1, 4, -1, -1).tolist(), "4 channels"),
    "values over 255": (lambda images: (images.long() + 200).tolist(), "expected 0..255"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_rest_bad_request_is_a_400_with_one_line(server, reference, case):
    make, says = BAD_REQUESTS[case]
    answer = invoke(server, {"inputs": {"image": make(reference["images"])}})
    assert answer.status_code == 400, answer.text
    body = answer.json()
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert says in body["message"] and "\n" not in body["message"], body["message"]
    assert "stack_trace" not in body and "Traceback" not in answer.text
