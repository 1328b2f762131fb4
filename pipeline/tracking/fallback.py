"""The local fallback store: when the tracking store could not take everything by the end of a run,
the whole run (params, dataset inputs, every metric from metrics.jsonl, artifacts, the logged model
and the metrics linked to it, status) is written to ``sqlite:///<output_dir>/tracking/fallback.db``.
A resumed training appends to the same fallback run (run.json remembers it and how many metric lines
it already holds)."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import DatasetInput, Metric, Param

from .names import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH
from .store import ModelUpload, register_model, send_model, upload_artifact

logger = logging.getLogger("pipeline.tracking")


def read_metrics(path: Path, skip: int) -> tuple[list[Metric], int]:
    """Metrics from metrics.jsonl after the first `skip` lines; also the number of lines."""
    metrics, lines = [], 0
    with open(path, encoding="utf-8") as f:
        for lines, line in enumerate(f, 1):
            if lines <= skip:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s:%d is not valid JSON (cut short by a crash?); skipped", path, lines)
                continue
            metrics += [Metric(k, v, row["timestamp"], row["step"]) for k, v in row["metrics"].items()]
    return metrics, lines


def write_fallback(directory: Path, *, experiment: str, run_name: str | None, tags: dict[str, str],
                   params: dict[str, str], artifacts: list[tuple[Path, str | None]], models: list[ModelUpload],
                   status: str, inputs: list[DatasetInput] | None = None) -> tuple[str, str, int] | None:
    """Write the run kept in `directory` (the tracker's folder) to its fallback store. Returns (store
    URI, fallback run id, metric lines written so far), or None when that failed too (logged)."""
    uri = f"sqlite:///{(directory / 'fallback.db').resolve()}"
    try:
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(
            experiment, artifact_location=(directory / "fallback-artifacts").resolve().as_uri())
        state = json.loads((directory / "run.json").read_text()) if (directory / "run.json").is_file() else {}
        run_id, skip = state.get("fallback_run_id"), state.get("fallback_lines", 0)
        if run_id:
            client.update_run(run_id, status="RUNNING")
            existing = client.get_run(run_id).data.params
        else:
            run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
            existing, skip = {}, 0
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, params=new[i:i + MAX_PARAMS_TAGS_PER_BATCH])
        if inputs:
            client.log_inputs(run_id, datasets=inputs)
        metrics, lines = read_metrics(directory / "metrics.jsonl", skip)
        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH])
        for path, artifact_path in artifacts:
            upload_artifact(client, run_id, path, artifact_path)
        for upload in models:
            copy = dataclasses.replace(upload, model_id=None, linked=False, sent=False)
            send_model(client, run_id, copy)
            if copy.register_as:
                try:
                    register_model(client, run_id, copy)
                except Exception as exc:  # noqa: BLE001 - registration is a convenience
                    logger.warning("MLflow: could not register the model as '%s' in the fallback "
                                   "store (%s)", copy.register_as, exc)
        client.set_terminated(run_id, status)
    except Exception as exc:  # noqa: BLE001 - the local record stays the source of truth
        logger.error("MLflow: writing the fallback store %s failed (%s); every metric is still in %s",
                     uri, exc, directory / "metrics.jsonl")
        return None
    return uri, run_id, lines
