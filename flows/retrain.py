"""Scheduled retraining: new classes in the incoming folder become one new task.

It starts from the registry's champion (its prompt, head, backbone and params),
trains on the new classes' images ONLY, evaluates on every class seen (the
champion's held-out set plus the new classes' held-out images) and registers a
candidate version (review=pending) whose gate judges, among the rest, its
accuracy on the incoming classes' held-out images. The champion alias is never
moved here: a reviewer approves. A crash leaves the champion and its task list
untouched, and the next run with the same champion, params and incoming images
resumes from the run's checkpoints (any other run folder starts clean).

    python flows/retrain.py                      # one run now
    python flows/retrain.py --serve [--cron ...] # Prefect serves it on a schedule
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline machines: no telemetry calls
import mlflow  # noqa: E402
import torch  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402

from promptcil import tracking  # noqa: E402
from promptcil.artifacts import load_tensors, read_json, save_tensors, write_json  # noqa: E402
from promptcil.config import load_params  # noqa: E402
from promptcil.data import ImageSet, TaskSplit  # noqa: E402
from promptcil.evaluation import accuracy_row, next_task_class_mean_accuracy  # noqa: E402
from promptcil.incoming import read_incoming  # noqa: E402
from promptcil.metrics import base_new_summary, summarize  # noqa: E402
from promptcil.plots import write_accuracy_plots  # noqa: E402
from promptcil.provenance import artifact_sha256, producer_record  # noqa: E402
from promptcil.runtime import resolve_device  # noqa: E402
from promptcil.train import IncrementalTrainer, task_state_path  # noqa: E402

import promptcil.serving  # noqa: E402


@task(name="fetch-champion", retries=2, retry_delay_seconds=2)
def fetch_champion(model_name: str, version: str, dst: Path) -> Path:
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{model_name}/{version}", dst_path=str(dst)))
    return local / "artifacts"


@flow(name="promptcil-retrain", log_prints=True)
def retrain(params_path: str = "params.yaml", progress: bool = False) -> dict:
    logger = get_run_logger()
    project = load_params(params_path)
    tracking.configure()
    name = project.registry.model_name
    serving = tracking.champion(name)
    if serving is None:
        raise RuntimeError(f"no champion for '{name}': approve a version first (promptcil review approve)")
    version = str(serving["version"])
    work = project.retrain.work_dir
    champ = fetch_champion(name, version, work / "champion")
    tasks = read_json(champ / "tasks.json")
    eval_tensors, eval_manifest = load_tensors(champ / "test.safetensors", kind="image_data")
    old_test = ImageSet(eval_tensors["images"], eval_tensors["labels"], tasks["class_names"])
    incoming, skipped = read_incoming(
        project.retrain.incoming, tasks["class_names"], old_test, project.retrain.test_fraction, project.train.seed
    )
    if skipped:
        logger.info("already learned, skipped: %s", ", ".join(skipped))
    if incoming is None:
        logger.info("no new classes in %s: nothing to do (champion is version %s)", project.retrain.incoming, version)
        return {"status": "no new classes", "champion": version}

    pending = _candidate_for(name, version, incoming.names)
    if pending is not None:
        logger.info("version %s already holds classes %s on top of champion %s (review=%s): nothing to do",
                    pending.version, incoming.names, version, pending.tags.get("review"))
        return {"status": "already registered", "version": str(pending.version), "champion": version}

    # one run folder per (champion, new classes): a crashed run resumes here next time
    key = hashlib.sha256(json.dumps([version, incoming.names]).encode()).hexdigest()[:12]
    run_dir = work / f"v{version}-{key}"
    champion_params = load_params(champ / "params.yaml")
    split = TaskSplit.from_dict(tasks["split"])
    seen = split.task_classes(split.num_tasks - 1).stop
    new_ids = list(range(max(split.class_order) + 1, max(split.class_order) + 1 + len(incoming.names)))
    grown = TaskSplit(split.class_order + new_ids, split.task_sizes + [len(new_ids)])
    new_task = grown.num_tasks - 1
    logger.info("new task %d: classes %s (%d training images)", new_task, incoming.names, len(incoming.train))

    device = resolve_device(champion_params.train.device)
    model = promptcil.serving.load_version_model(
        champion_params, champ / "backbone", task_state_path(champ, split.num_tasks - 1)
    )
    new_train = ImageSet(incoming.train.images, incoming.train.labels + seen, incoming.names)
    producer = producer_record(
        {"champion": version, "method": champion_params.method.model_dump(mode="json"),
         "head": champion_params.head.model_dump(mode="json"), "train": champion_params.train.model_dump(mode="json"),
         "test_fraction": project.retrain.test_fraction, "split_seed": project.train.seed},
        {"champion_state": artifact_sha256(task_state_path(champ, split.num_tasks - 1)), "incoming": incoming.sha256},
    )
    logs = IncrementalTrainer(model, grown, champion_params.train, run_dir, device, progress=progress,
                              producer=producer).run(new_train, tasks=[new_task], resume=True)

    class_names = tasks["class_names"] + incoming.names
    test = ImageSet(torch.cat([old_test.images, incoming.test.images]),
                    torch.cat([old_test.labels, incoming.test.labels + seen]), class_names)
    old_metrics = read_json(champ / "metrics.json")
    state = task_state_path(run_dir, new_task)
    new_row = accuracy_row(model, state, new_task, test, grown, champion_params.eval.batch_size, device)
    matrix = [row + [None] for row in old_metrics["accuracy_matrix"]] + [new_row]
    counts = old_metrics["test_samples_per_task"] + [len(incoming.test)]
    metrics = summarize(matrix, counts)
    metrics |= {"method": champion_params.method.name, "head": champion_params.head.name,
                "test_samples_per_task": counts, "retrained_from": version, "incoming_accuracy": new_row[-1]}
    if "next_task_class_mean_after_task" in old_metrics:
        # DePT's base/new, continued: how the untrained champion's class means separate the incoming classes
        # among themselves (a single new class has no "among": None)
        champion_next = None if len(incoming.names) < 2 else next_task_class_mean_accuracy(
            model, task_state_path(champ, split.num_tasks - 1), split.num_tasks - 1, new_train, test, grown,
            champion_params.eval.batch_size, device)
        metrics |= base_new_summary(metrics["accuracy_after_task"],
                                    old_metrics["next_task_class_mean_after_task"][:-1] + [champion_next, None])
    out = run_dir / "version"
    write_json(out / "tasks.json", {**tasks, "split": grown.to_dict(), "num_tasks": grown.num_tasks,
                                    "class_names": class_names})
    save_tensors(out / "test.safetensors", {"images": test.images, "labels": test.labels}, kind="image_data",
                 metadata={**eval_manifest["metadata"], "class_names": class_names})
    write_json(out / "metrics.json", metrics)
    write_accuracy_plots(metrics, out)
    registered = tracking.log_pipeline_run(
        registry=project.registry,
        params=champion_params.model_dump(mode="json"),
        metrics=metrics,
        task_logs=[{"task": log.task, "samples": log.samples, "epoch_losses": log.epoch_losses} for log in logs],
        artifact_dirs={"evaluate": out},
        tags={"retrained_from": version, "new_classes": json.dumps(incoming.names)},
        model_code=Path(promptcil.serving.__file__),
        model_artifacts=promptcil.serving.version_artifacts(
            params=champ / "params.yaml", backbone=champ / "backbone", task_state=state,
            tasks=out / "tasks.json", eval_set=out / "test.safetensors", metrics=out / "metrics.json",
        ),
        input_example=test.images[:2].numpy(),
    )
    logger.info("registered %s version %s (review=pending, gate=%s); A_last %.3f, incoming classes %.3f",
                name, registered["version"], registered["gate"], metrics["A_last"], metrics["incoming_accuracy"])
    return {"status": "registered", "new_classes": incoming.names, "A_last": metrics["A_last"], **registered}


def _candidate_for(model_name: str, champion: str, new_classes: list[str]):
    """A registered, not rejected version already retrained from `champion` on exactly `new_classes`."""
    client = MlflowClient()
    for mv in client.search_model_versions(f"name='{model_name}'"):
        run_tags = client.get_run(mv.run_id).data.tags if mv.run_id else {}
        if (run_tags.get("retrained_from") == champion and run_tags.get("new_classes") == json.dumps(new_classes)
                and mv.tags.get("review") != "rejected"):
            return mv
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--serve", action="store_true", help="serve on a schedule with Prefect")
    parser.add_argument("--cron", default=None, help="cron schedule (default: retrain.cron in params.yaml)")
    args = parser.parse_args()
    if args.serve:
        cron = args.cron or load_params(args.params).retrain.cron
        retrain.serve(name="promptcil-retrain", cron=cron, parameters={"params_path": args.params})
    else:
        print(retrain(args.params))


if __name__ == "__main__":
    main()
