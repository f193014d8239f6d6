"""Review: model-version tags, one alias, and approval records that the MLflow UI cannot make.

``review`` (pending → approved | rejected) and ``gate`` (passed | failed) are tags; the alias
``champion`` marks the version that serves. `approve` is the only code in promptcil that sets
the alias, and it re-reads the tags right before and right after setting it, so a version that
is not approved, or failed the quality gate, never stays champion.

Tags and aliases can also be edited in the MLflow UI, which would bypass that. So `approve` also
writes an approval record the UI cannot produce: a run in the experiment `promptcil-reviews` whose
params (which nothing can edit after they are logged) name the model, the version and the version's
source, linked from the version's tag `approval_run_id`; and the registration run's params record
the quality gate's verdict. `verified_champion` (the retrain flow, `promptcil predict`, the served
model) accepts a champion only with a matching record and a passed gate in its run's params.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException

from promptcil.errors import ReviewError

CHAMPION = "champion"
REVIEW_EXPERIMENT = "promptcil-reviews"
GATE_PARAM = "promptcil.gate"  # the registration run's param: the gate's verdict, uneditable


def list_versions(model_name: str) -> list[dict[str, Any]]:
    """Every version of `model_name`, newest first, with its review state and metrics."""
    client = MlflowClient()
    aliases: dict[str, list[str]] = {}
    for alias, version in _registered_model(client, model_name).aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    found = client.search_model_versions(filter_string=f"name = {_quoted(model_name)}")
    described = [_describe(v) for v in sorted(found, key=lambda v: int(v.version), reverse=True)]
    for row in described:  # search results leave aliases out; the registered model holds them
        row["aliases"] = sorted(aliases.get(row["version"], []))
    return described


def champion(model_name: str) -> dict[str, Any] | None:
    """The version that serves (alias `champion`); None when the model or the alias does not exist."""
    client = MlflowClient()
    version = _champion_version(client, model_name)
    return None if version is None else _describe(client.get_model_version(model_name, version))


def verified_champion(model_name: str) -> dict[str, Any] | None:
    """The champion, refused (ReviewError) unless `promptcil review approve` recorded its approval; None
    when there is no champion."""
    client = MlflowClient()
    version = _champion_version(client, model_name)
    if version is None:
        return None
    current = client.get_model_version(model_name, version)
    verify_approval(client, current)
    return _describe(current)


def refuse_unapproved_champion(model_name: str, model_id: str) -> None:
    """Refuse (ReviewError) when the logged model `model_id` is `model_name`'s champion without a recorded
    approval (what the served model checks as it loads; `model_name` is its params' registry.model_name,
    under which promptcil registers it)."""
    client = MlflowClient()
    number = _champion_version(client, model_name)
    if number is not None and _model_id(current := client.get_model_version(model_name, number)) == model_id:
        verify_approval(client, current)


def _model_id(version: ModelVersion) -> str | None:
    """The logged model a version holds: its `models:/<id>` source, or the MLmodel of a source folder."""
    import yaml

    if version.source.startswith("models:/"):
        return version.source.removeprefix("models:/")
    mlmodel = Path(version.source.removeprefix("file://")) / "MLmodel"
    return yaml.safe_load(mlmodel.read_text()).get("model_id") if mlmodel.is_file() else None


def champion_of_uri(model_uri: str) -> None:
    """For `models:/NAME@champion`, refuse a champion whose approval `approve` did not record."""
    name, _, alias = model_uri.removeprefix("models:/").partition("@")
    if model_uri.startswith("models:/") and alias == CHAMPION:
        verified_champion(name)


def verify_approval(client: MlflowClient, version: ModelVersion) -> None:
    """Refuse a version whose approval is not one `approve` recorded (a tag or an alias moved in the UI)."""
    label, tags = f"{version.name} version {version.version}", version.tags
    fix = f"approve it with `promptcil review approve {version.version} --reviewer NAME`"
    _check_can_serve(version, require_approved=True)
    record_id = tags.get("approval_run_id")
    try:
        record = client.get_run(record_id) if record_id else None
    except MlflowException:
        record = None
    expected = {"model": version.name, "version": str(version.version), "source": version.source}
    if (record is None or record.data.tags.get("promptcil.review") != "approval"
            or any(record.data.params.get(key) != value for key, value in expected.items())):
        raise ReviewError(f"{label} carries no approval recorded by promptcil review (a tag or alias edited in "
                          f"the MLflow UI?): {fix}")
    registered_by = client.get_run(version.run_id).data.params.get(GATE_PARAM) if version.run_id else None
    if registered_by not in (None, "passed"):
        raise ReviewError(f"{label}'s registration recorded gate={registered_by}: it cannot serve")


def approve(model_name: str, version: int | str, reviewer: str, note: str | None = None) -> dict[str, Any]:
    """Approve a version and make it champion (the alias moves from the previous champion).

    Approving an earlier approved version again is how a champion is rolled back.
    """
    if not reviewer.strip():
        raise ReviewError("approving needs a reviewer name")
    client = MlflowClient()
    current = _model_version(client, model_name, version)
    number = str(current.version)  # the sqlite store returns an int, the REST store a string
    _check_can_serve(current, require_approved=False)
    registered_gate = client.get_run(current.run_id).data.params.get(GATE_PARAM) if current.run_id else None
    if registered_gate not in (None, "passed"):
        raise ReviewError(f"{model_name} version {number}'s registration recorded gate={registered_gate} (its tag "
                          "was edited): it cannot be approved")
    previous = _champion_version(client, model_name)
    tags = {"reviewer": reviewer, "reviewed_at": _utc_now(),
            "approval_run_id": _record_approval(client, current, reviewer, note, previous)}
    if note:
        tags["review_note"] = note
    if previous is not None and previous != number:
        tags["previous_champion"] = previous
    tags["review"] = "approved"  # last: the version reads approved only once its audit tags are there
    for key, value in tags.items():
        client.set_model_version_tag(model_name, number, key, value)
    # The invariant's check: what the store holds now, not what this call wrote (a concurrent
    # `reject` may have landed in between).
    _check_can_serve(client.get_model_version(model_name, number), require_approved=True)
    client.set_registered_model_alias(model_name, CHAMPION, number)
    after = client.get_model_version(model_name, number)
    try:
        _check_can_serve(after, require_approved=True)
    except ReviewError:
        # A reject raced the alias: give the alias back before anyone serves this version.
        if previous is not None and previous != number:
            client.set_registered_model_alias(model_name, CHAMPION, previous)
        else:
            client.delete_registered_model_alias(model_name, CHAMPION)
        raise
    described = f"{after.description or ''}".split("\n\nApproved by")[0]
    client.update_model_version(model_name, number, description=f"{described}\n\nApproved by {reviewer} on "
                                f"{tags['reviewed_at']}" + (f": {note}" if note else "") + ".")
    # previous_champion here: the champion right before this call (None: none, or this version)
    return _describe(after) | {"previous_champion": previous if previous != number else None}


def _record_approval(client: MlflowClient, version: ModelVersion, reviewer: str, note: str | None,
                     previous: str | None) -> str:
    """The approval record: a finished run whose params name exactly this version (see the module doc)."""
    from mlflow.entities import Param

    from promptcil.tracking.store import experiment_id

    run = client.create_run(experiment_id(REVIEW_EXPERIMENT), tags={"promptcil.review": "approval"},
                            run_name=f"{version.name} v{version.version} approved by {reviewer}")
    params = {"model": version.name, "version": str(version.version), "source": version.source,
              "reviewer": reviewer, "note": (note or "")[:500], "previous_champion": previous or ""}
    client.log_batch(run.info.run_id, params=[Param(key, value) for key, value in params.items()])
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def reject(model_name: str, version: int | str, reason: str) -> dict[str, Any]:
    """Mark a version rejected: it can never be approved, so it can never serve."""
    if not reason.strip():
        raise ReviewError("rejecting needs a reason")
    client = MlflowClient()
    current = _model_version(client, model_name, version)
    number = str(current.version)
    if _champion_version(client, model_name) == number:
        raise ReviewError(_champion_refusal(model_name, number))
    before = current.tags.get("review")
    for key, value in {"reject_reason": reason, "reviewed_at": _utc_now(), "review": "rejected"}.items():
        client.set_model_version_tag(model_name, number, key, value)
    if _champion_version(client, model_name) == number:
        # An approve moved the alias here in between: it won, so undo this rejection.
        if before is None:
            client.delete_model_version_tag(model_name, number, "review")
        else:
            client.set_model_version_tag(model_name, number, "review", before)
        raise ReviewError(_champion_refusal(model_name, number))
    return _describe(client.get_model_version(model_name, number))


def _check_can_serve(version: ModelVersion, *, require_approved: bool) -> None:
    """Refuse a version that must not serve: gate failed or missing, rejected, (or not yet approved)."""
    tags, label = version.tags, f"{version.name} version {version.version}"
    if tags.get("gate") == "failed":
        reasons = tags.get("gate_reasons", "no reasons recorded")
        raise ReviewError(f"{label} failed the quality gate ({reasons}); it cannot be approved")
    if tags.get("gate") != "passed":
        raise ReviewError(f"{label} has no quality-gate result (tag gate); register it through promptcil")
    if tags.get("review") == "rejected":
        reason = tags.get("reject_reason", "no reason recorded")
        raise ReviewError(f"{label} was rejected ({reason}); register a new version")
    if require_approved and tags.get("review") != "approved":
        raise ReviewError(f"{label} is not approved (review={tags.get('review')}); approve it first")


def _champion_refusal(model_name: str, version: str) -> str:
    return f"{model_name} version {version} is the champion; approve another version first"


def _registered_model(client: MlflowClient, model_name: str) -> RegisteredModel:
    try:
        return client.get_registered_model(model_name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        registered = _some(_model_names(client))
        raise ReviewError(f"no registered model '{model_name}' (registered: {registered})") from None


def _model_version(client: MlflowClient, model_name: str, version: int | str) -> ModelVersion:
    number = str(version).strip()
    if not number.isdigit() or int(number) < 1:
        raise ReviewError(f"version must be a positive number, got '{version}'")
    number = str(int(number))
    _registered_model(client, model_name)
    try:
        return client.get_model_version(model_name, number)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    owners = [name for name in _model_names(client) if name != model_name and _has_version(client, name, number)]
    elsewhere = f"; version {number} belongs to {_some([repr(n) for n in owners])}" if owners else ""
    raise ReviewError(f"'{model_name}' has no version {number}{elsewhere}") from None


def _some(names: list[str], shown: int = 8) -> str:
    """Names for a one-line message: the first few, then how many more."""
    more = f", +{len(names) - shown} more" if len(names) > shown else ""
    return (", ".join(names[:shown]) or "none") + more


def _has_version(client: MlflowClient, model_name: str, version: str) -> bool:
    try:
        client.get_model_version(model_name, version)
        return True
    except MlflowException:
        return False


def _model_names(client: MlflowClient) -> list[str]:
    names, token = [], None
    while True:
        page = client.search_registered_models(page_token=token)
        names += [model.name for model in page]
        token = page.token
        if not token:
            return sorted(names)


def _champion_version(client: MlflowClient, model_name: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(model_name, CHAMPION).version)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _describe(version: ModelVersion) -> dict[str, Any]:
    tags = version.tags

    def number(key: str) -> float | None:
        return float(tags[key]) if key in tags else None

    return {
        "version": str(version.version),
        "review": tags.get("review"),
        "gate": tags.get("gate"),
        "gate_reasons": tags.get("gate_reasons"),
        "A_last": number("A_last"),
        "A_avg": number("A_avg"),
        "forgetting": number("forgetting"),
        "aliases": sorted(version.aliases),
        "run_id": tags.get("run_id") or version.run_id,
        "created": datetime.fromtimestamp(version.creation_timestamp / 1000, UTC).isoformat(timespec="seconds"),
        "reviewer": tags.get("reviewer"),
        "previous_champion": tags.get("previous_champion"),
        "note": tags.get("reject_reason") if tags.get("review") == "rejected" else tags.get("review_note"),
    }


def _quoted(name: str) -> str:
    """A registered-model name as a filter-string literal (MLflow's filters have no escapes)."""
    quote = '"' if "'" in name else "'"
    if quote in name:
        raise ReviewError(f"model name {name!r} holds both quote characters; rename the model")
    return f"{quote}{name}{quote}"


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
