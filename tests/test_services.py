"""The team stack for real: PostgreSQL (Debian's package), an MLflow tracking server on it with proxied
artifacts, a Prefect server on it and a worker on a process work pool, all started by `promptcil services
start` on free localhost ports. The pipeline registers through the tracking server, two registrations
race, a review approves, a deployment run executes on the worker, the served champion answers a PNG, and
the MLflow UI shows the version with its tags (headless Chromium; the screenshot is kept)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from promptcil.services import free_port, postgres_bin

from conftest import REPO, write_params

pytestmark = pytest.mark.slow
FASHION = Path("/usr/share/datasets/fashion-mnist")
ARTIFACTS = REPO / "outputs" / "test-artifacts"  # kept after the run (git-ignored): the UI's screenshot


def have_postgres() -> bool:
    try:
        postgres_bin("initdb")
        return True
    except Exception:
        return False


def command(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / args[0]), *args[1:]]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A workspace with the tiny params and the stack started for it; stopped at the end."""
    if not have_postgres():
        pytest.skip("PostgreSQL is not installed (make test installs Debian's postgresql as root)")
    root = tmp_path_factory.mktemp("team")
    write_params(root)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    started = subprocess.run(command("promptcil", "services", "start", "--root", str(root)), env=env,
                             capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stderr[-3000:]
    for line in (root / ".services.env").read_text().splitlines():
        key, value = line.removeprefix("export ").split("=", 1)
        env[key] = value
    env["PREFECT_HOME"] = str(root / ".prefect-client")
    try:
        yield root, env
    finally:
        stopped = subprocess.run(command("promptcil", "services", "stop", "--root", str(root)), env=env,
                                 capture_output=True, text=True, timeout=300)
        assert stopped.returncode == 0, stopped.stderr[-3000:]
        assert not (root / ".services.env").exists()


def run(args: list[str], env: dict[str, str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (args, done.stdout[-3000:], done.stderr[-3000:])
    return done


def test_the_stack_serves_the_pipeline_reviews_deployments_and_predictions(stack, tmp_path):
    from mlflow import MlflowClient

    root, env = stack
    uri = env["MLFLOW_TRACKING_URI"]
    assert uri.startswith("http://127.0.0.1:") and env["PREFECT_API_URL"].endswith("/api")

    # the pipeline registers through the tracking server; its artifacts travel through the server's proxy
    run([sys.executable, "-m", "flows.pipeline", "--root", str(root)], env, tmp_path)
    registration = json.loads((root / "outputs" / "register" / "registration.json").read_text())
    assert registration["tracking_uri"] == uri and registration["version"] == "1"
    client = MlflowClient(uri, uri)
    version = client.get_model_version("promptcil", "1")
    assert version.tags["review"] == "pending" and version.description.startswith("Learned")
    downloaded = tmp_path / "downloaded"
    import mlflow.artifacts

    mlflow.artifacts.download_artifacts("models:/promptcil/1", dst_path=str(downloaded), tracking_uri=uri)
    assert (downloaded / "artifacts" / "params.yaml").is_file()
    assert list((root / ".services" / "mlflow-artifacts").rglob("params.yaml"))  # stored by the server, not here

    # two registrations at once get distinct versions (the server's PostgreSQL store)
    script = "import mlflow; print(mlflow.register_model('models:/promptcil/1', 'promptcil').version)"
    racers = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
              for _ in range(2)]
    versions = sorted(racer.communicate(timeout=120)[0].strip().splitlines()[-1] for racer in racers)
    assert versions == ["2", "3"]

    # a review approves through the server
    approved = run(command("promptcil", "review", "approve", "1", "--reviewer", "ada"), env, root)
    assert "now champion" in approved.stdout
    listed = run(command("promptcil", "review", "list"), env, root)
    assert uri in listed.stdout and "approved" in listed.stdout

    # deployments from prefect.yaml; a retrain run is picked up by the worker and registers a candidate
    run(command("promptcil", "deploy", "--root", str(root)), env, REPO)
    if FASHION.is_dir():
        from test_retrain import write_new_class

        for label, name in ((7, "sneaker"), (8, "bag")):
            write_new_class(root / "incoming" / name, fashion_label=label, count=16, tmp=tmp_path)
        run(command("prefect", "deployment", "run", "promptcil-retrain/retrain", "--watch"), env, root)
        newest = max(client.search_model_versions("name='promptcil'"), key=lambda v: int(v.version))
        assert client.get_run(newest.run_id).data.tags.get("retrained_from") == "1"

    # the served champion answers a PNG
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(command("mlflow", "models", "serve", "-m", "models:/promptcil@champion",
                                      "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)),
                              env=env | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(1)
        png = io.BytesIO()
        Image.new("L", (8, 8), 128).save(png, format="PNG")
        body = json.dumps({"inputs": {"image": [base64.b64encode(png.getvalue()).decode()]}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        class_names = json.loads((root / "outputs" / "prepare" / "tasks.json").read_text())["class_names"]
        assert len(answer["predictions"]) == 1 and answer["predictions"][0] in class_names
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()

    # the MLflow UI's registered-model page shows the version with its tags (headless Chromium)
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (make test installs it as root)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = f"{uri}/#/models/promptcil/versions/1"
    browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
               "--window-size=1400,1000"]
    dom = run([*browser, "--dump-dom", page], env, tmp_path, timeout=120).stdout
    assert "review" in dom and "approved" in dom and "gate" in dom and "passed" in dom, dom[-2000:]
    screenshot = ARTIFACTS / "mlflow-ui-model-version.png"
    run([*browser, f"--screenshot={screenshot}", page], env, tmp_path, timeout=120)
    assert screenshot.stat().st_size > 10_000  # a rendered page, not a blank one
