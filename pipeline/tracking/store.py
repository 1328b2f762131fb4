"""The MLflow calls the tracker's worker makes: open (or continue) a run, params, dataset inputs,
artifact files and the logged model (with the evaluation metrics that measure it).

The model (`Tracker.log_model`) becomes an MLflow 3 *logged model* named `model`, linked to the run as
its output: `send_model` does what MLflow's fluent log_model does, with an explicit client (no active
run) and from a directory already saved by pipeline.serving; `register_model` adds a registered model
version. Both are safe to retry: they continue where a failed call stopped.
"""
from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import DatasetInput, LoggedModelOutput, Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException

from pipeline.fileio import atomic_write

from .names import MAX_TAG_VAL_LENGTH, MODEL_VERSIONS_TAG, clip_value

logger = logging.getLogger("pipeline.tracking")
# Errors that retrying cannot fix (bad request, missing run, ...).
PERMANENT_ERRORS = frozenset({
    "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE",
    "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED", "ENDPOINT_NOT_FOUND",
})


def open_run(client: MlflowClient, experiment: str, run_name: str | None, tags: dict[str, str],
             resume_id: str | None, tracking_uri: str) -> tuple[Run, dict[str, str]]:
    """Continue run `resume_id` (RUNNING again, tags updated) or create a new run in `experiment`
    (a resumed id the store does not know gets a new run tagged resumed_from_run_id). Returns the run
    and the params it already has."""
    run = None
    if resume_id:
        try:
            run = client.get_run(resume_id)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            logger.warning("MLflow run %s (to resume) is not in %s; starting a new run", resume_id, tracking_uri)
    if run is not None:
        client.update_run(resume_id, status="RUNNING")
        client.log_batch(resume_id, tags=[RunTag(k, v) for k, v in tags.items()])
        return run, dict(run.data.params)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        try:
            experiment_id = client.create_experiment(experiment)
        except MlflowException as exc:  # another job created it in the meantime
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment_id = client.get_experiment_by_name(experiment).experiment_id
    else:
        experiment_id = found.experiment_id
    tags = dict(tags, **({"resumed_from_run_id": resume_id} if resume_id else {}))
    return client.create_run(experiment_id, run_name=run_name, tags=tags), {}


def log_params(client: MlflowClient, run_id: str, params: dict[str, str], existing: dict[str, str]) -> None:
    """Log the params the run does not have yet. MLflow refuses to change a logged param, which a
    resumed run may try (e.g. more epochs): the first values are kept, and a tag says which changed."""
    changed = [k for k, v in params.items() if k in existing and existing[k] != v]
    if changed:
        logger.warning("MLflow run %s: params %s differ from the run being resumed; the first "
                       "values are kept (config.yaml has the new ones)", run_id, changed)
        client.set_tag(run_id, "params_changed_on_resume", clip_value(changed, MAX_TAG_VAL_LENGTH))
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    if new:
        client.log_batch(run_id, params=new)


def log_inputs(client: MlflowClient, run_id: str, inputs: list[DatasetInput]) -> None:
    """The run's dataset inputs (pipeline.tracking.datasets). Safe to repeat: MLflow keeps one input
    per dataset (name and digest) and run."""
    client.log_inputs(run_id, datasets=inputs)


def upload_artifact(client: MlflowClient, run_id: str, path: Path, artifact_path: str | None) -> None:
    """A file goes to <artifact_path>/<name>; a directory too, with its contents below it."""
    if path.is_dir():
        client.log_artifacts(run_id, str(path), posixpath.join(artifact_path or "", path.name))
    else:
        client.log_artifact(run_id, str(path), artifact_path)


@dataclass
class ModelUpload:
    """A model saved at log_model time, on its way to becoming the run's logged model. The ids are
    kept so that a retried call continues where the failed one stopped (no second logged model).
    `metrics` (points the run has) measure this model, on the dataset `dataset` ((name, digest) of a
    dataset input, or None): they are linked to it once it exists."""
    path: Path
    step: int
    params: dict[str, str]
    register_as: str | None
    metrics: list[Metric] = field(default_factory=list)
    dataset: tuple[str, str] | None = None
    model_id: str | None = None
    linked: bool = False
    sent: bool = False


MODEL_TYPE = "alignedreid-embedder"
_EXISTS = ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS")


def send_model(client: MlflowClient, run_id: str, upload: ModelUpload) -> None:
    """Make `upload` the run's logged model: create it (name 'model', source run `run_id`), record it
    as the run's output, upload its files, mark it READY. What MLflow's fluent log_model does, with an
    explicit client (no active run) and from a directory already saved."""
    from mlflow.models import Model

    from pipeline.serving import MODEL_NAME

    if upload.model_id is None:
        experiment_id = client.get_run(run_id).info.experiment_id
        logged = client.create_logged_model(experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                            params=upload.params, model_type=MODEL_TYPE)
        upload.model_id = logged.model_id
    if not upload.linked:
        outputs = client.get_run(run_id).outputs
        if not any(o.model_id == upload.model_id for o in (outputs.model_outputs if outputs else [])):
            client.log_outputs(run_id, [LoggedModelOutput(upload.model_id, step=upload.step)])
        upload.linked = True
    # The MLmodel file names its logged model and run, as one written by MLflow's log_model does.
    meta = Model.load(str(upload.path / "MLmodel"))
    meta.model_id, meta.model_uuid, meta.run_id = upload.model_id, upload.model_id, run_id
    meta.artifact_path = client.get_logged_model(upload.model_id).artifact_location
    atomic_write(upload.path / "MLmodel", meta.to_yaml())
    client.log_model_artifacts(upload.model_id, str(upload.path))
    client.finalize_logged_model(upload.model_id, "READY")
    link_metrics(client, run_id, upload)
    upload.sent = True


def link_metrics(client: MlflowClient, run_id: str, upload: ModelUpload) -> None:
    """Log `upload.metrics` with the logged model's id (and the evaluation dataset), as MLflow 3's
    log_metrics(model_id=...) does: `get_logged_model(model_id).metrics` then lists them. They are
    points the run already has (same key, value, step, timestamp), which MLflow does not store twice,
    so the run's history is unchanged, and a repeated call changes nothing."""
    if not upload.metrics:
        return
    name, digest = upload.dataset or (None, None)
    client.log_batch(run_id, metrics=[Metric(m.key, m.value, m.timestamp, m.step, model_id=upload.model_id,
                                             dataset_name=name, dataset_digest=digest)
                                      for m in upload.metrics])


def register_model(client: MlflowClient, run_id: str, upload: ModelUpload) -> str | None:
    """A new version of the registered model `upload.register_as` from the logged model (creating
    the registered model the first time). Returns the version, or None when the registry refuses
    for good (logged as a warning: registration is a convenience, never a reason to fail).
    Store trouble (no answer) raises, so that the caller retries."""
    name = upload.register_as
    if not upload.sent:
        logger.warning("MLflow: the model was not logged, so it is not registered as '%s'", name)
        return None
    try:
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code not in _EXISTS:
                raise
        # The source is the logged model's artifact location, not models:/<model_id> (MLflow's own
        # choice): MLflow 3.17's sqlite registry looks a models:/ source up through the process-wide
        # tracking URI, not this client's, and fails when they differ.
        logged = client.get_logged_model(upload.model_id)
        source = logged.artifact_location
        # A retried call must not add a second version: look for one made from this logged model.
        done = [v for v in client.search_model_versions(f"run_id = '{run_id}'")
                if v.name == name and v.source == source]
        version = done[0] if done else client.create_model_version(
            name, source=source, run_id=run_id, model_id=upload.model_id, await_creation_for=0)
        # What MLflow's log_model(registered_model_name=...) records: the logged model lists its versions.
        tags = logged.tags
        versions = json.loads(tags.get(MODEL_VERSIONS_TAG) or "[]")
        if {"name": name, "version": str(version.version)} not in versions:
            versions.append({"name": name, "version": str(version.version)})
            client.set_logged_model_tags(upload.model_id, {MODEL_VERSIONS_TAG: json.dumps(versions)})
    except MlflowException as exc:
        if exc.error_code not in PERMANENT_ERRORS:
            raise
        logger.warning("MLflow: could not register the model as '%s' (%s); it stays logged in run %s",
                       name, exc, run_id)
        return None
    logger.info("MLflow: registered the model as '%s' version %s", name, version.version)
    return str(version.version)
