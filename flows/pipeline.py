"""The full pipeline as one Prefect flow: the SAME stage functions `dvc repro` runs.

    python flows/pipeline.py            # what `make demo` runs
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline machines: no telemetry calls
from prefect import flow, get_run_logger, task

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: stages/ is a sibling

from stages.evaluate import evaluate  # noqa: E402
from stages.features import features  # noqa: E402
from stages.prepare import prepare  # noqa: E402
from stages.pretrain import pretrain  # noqa: E402
from stages.prompt_init import prompt_init  # noqa: E402
from stages.prototypes import prototypes  # noqa: E402
from stages.register import register  # noqa: E402
from stages.train import train  # noqa: E402

# I/O-bound steps retry (a busy disk, a locked sqlite store); compute steps do not, they resume instead.
prepare_task = task(prepare, name="prepare", retries=2, retry_delay_seconds=2)
pretrain_task = task(pretrain, name="pretrain")
features_task = task(features, name="features")
prototypes_task = task(prototypes, name="prototypes")
prompt_init_task = task(prompt_init, name="prompt_init")
train_task = task(train, name="train")
evaluate_task = task(evaluate, name="evaluate")
register_task = task(register, name="register", retries=2, retry_delay_seconds=2)


@flow(name="promptcil-pipeline", log_prints=True)
def pipeline(params_path: str = "params.yaml", progress: bool = True) -> dict:
    logger = get_run_logger()
    split = prepare_task(params_path)
    logger.info("prepared %d tasks", split["num_tasks"])
    backbone = pretrain_task(params_path, progress=progress)
    logger.info("backbone %s (%s), weights sha256 %s", backbone["name"], backbone["source"], backbone["weights_sha256"][:12])
    features_task(params_path)
    prototypes_task()
    prompt_init_task(params_path)
    train_task(params_path, progress=progress)
    metrics = evaluate_task(params_path)
    logger.info("A_last %.3f  A_avg %.3f  forgetting %s", metrics["A_last"], metrics["A_avg"], metrics["forgetting"])
    registered = register_task(params_path)
    return {"A_last": metrics["A_last"], "A_avg": metrics["A_avg"], "forgetting": metrics["forgetting"], **registered}


if __name__ == "__main__":
    from promptcil.report import print_summary

    from promptcil.artifacts import read_json

    result = pipeline()
    print_summary(result, read_json(Path("outputs/evaluate/metrics.json")))
