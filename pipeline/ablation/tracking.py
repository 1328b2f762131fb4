"""MLflow for an ablation: the parent run, and what goes onto it and its children."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable

from .options import METRICS, AblationError


class AblationTracking:
    """The ablation's MLflow side: parent run, child tags and test metrics, parent summary.

    Creating (or reopening) the parent must work, or the ablation stops before training (the user
    asked for tracking: pass tracking.enabled=false to do without). Afterwards every call is
    best-effort: a failure is reported once on stderr and the ablation goes on, its files complete."""

    def __init__(self, uri: str, experiment: str):
        from mlflow import MlflowClient

        self.uri, self.experiment = uri, experiment
        self.client = MlflowClient(tracking_uri=uri)
        self.parent_id: str | None = None
        self._warned = False

    def open_parent(self, run_name: str, previous: dict | None, params: dict[str, str],
                    tags: dict[str, str]) -> str:
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException

        try:
            run = None
            if previous and previous.get("tracking_uri") == self.uri and previous.get("experiment") == self.experiment \
                    and previous.get("parent_run_id"):
                try:
                    run = self.client.get_run(previous["parent_run_id"])
                    if run.info.lifecycle_stage != "active":
                        run = None
                except MlflowException:
                    run = None
            if run is None:
                exp = self.client.get_experiment_by_name(self.experiment)
                exp_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment)
                run = self.client.create_run(exp_id, run_name=run_name)
            else:
                self.client.update_run(run.info.run_id, status="RUNNING")
            self.parent_id = run.info.run_id
            new = [Param(k, v) for k, v in params.items() if k not in run.data.params]
            self.client.log_batch(self.parent_id, params=new, tags=[RunTag(k, v) for k, v in tags.items()])
        except Exception as exc:  # noqa: BLE001 - any store failure at the start stops the ablation
            raise AblationError(f"MLflow at {self.uri} (experiment '{self.experiment}'): cannot open the "
                                f"ablation's parent run ({type(exc).__name__}: {str(exc)[:300]}). Start the "
                                "server, pass --tracking-uri, or add tracking.enabled=false") from None
        return self.parent_id

    def _safe(self, what: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - tracking never takes the results down
            if not self._warned:
                self._warned = True
                print(f"warning: MLflow at {self.uri}: {what} failed ({type(exc).__name__}: {str(exc)[:300]}); "
                      "the results are complete on disk", file=sys.stderr, flush=True)

    def log_child(self, run_id: str | None, tags: dict[str, str], tests: dict[str, dict]) -> None:
        """Tag a training run as a child (again: also when it was created before this parent) and
        log its test metrics as test/<test>/<metric> (only those not already there), linked to the
        run's logged model (the network the tests measured: MLflow 3 model metrics) and to its
        evaluation dataset input when the run has them."""
        if not run_id:
            return
        from mlflow.entities import Metric, RunTag

        def send():
            run = self.client.get_run(run_id)
            existing = run.data.metrics
            model_id, dataset = _measured(run)
            now = int(time.time() * 1000)
            metrics = [Metric(f"test/{key}/{m}", float(r[m]), now, 0, model_id=model_id,
                              dataset_name=dataset[0], dataset_digest=dataset[1])
                       for key, r in tests.items() for m in ("rank1", "rank5", "mAP", "mINP")
                       if existing.get(f"test/{key}/{m}") != float(r[m])]
            self.client.log_batch(run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()])

        self._safe(f"logging to run {run_id}", send)

    def log_parent(self, metrics: dict[str, float], files: list[Path]) -> None:
        from mlflow.entities import Metric

        def send():
            now = int(time.time() * 1000)
            entries = [Metric(k, v, now, 0) for k, v in metrics.items()]
            for i in range(0, len(entries), 1000):
                self.client.log_batch(self.parent_id, metrics=entries[i:i + 1000])
            for path in files:
                self.client.log_artifact(self.parent_id, str(path))

        self._safe("logging the summary to the parent run", send)

    def finish(self, status: str) -> None:
        if self.parent_id:
            self._safe("ending the parent run", lambda: self.client.set_terminated(self.parent_id, status))


def _measured(run) -> tuple[str | None, tuple[str | None, str | None]]:
    """The run's logged model (its newest model output) and its evaluation dataset input (name,
    digest); None where the run has none (tracking.log_model=false, an older run)."""
    outputs = run.outputs.model_outputs if run.outputs else []
    model_id = max(outputs, key=lambda o: o.step).model_id if outputs else None
    inputs = run.inputs.dataset_inputs if run.inputs else []
    evaluated = [i.dataset for i in inputs if any(t.key == "mlflow.data.context" and t.value == "evaluation"
                                                  for t in i.tags)]
    return model_id, ((evaluated[0].name, evaluated[0].digest) if evaluated else (None, None))


def parent_metrics(report: dict) -> dict[str, float]:
    """The table as parent-run metrics: <variant>/<test>/<metric>_mean|_std and gain/<key>/<metric>_...,
    prefixed with misalign-<level>/ for the blocks of the misalignment curve."""
    out = {}
    for name, block in report["blocks"].items():
        prefix = f"{name}/" if block["misalign"] is not None else ""
        for variant, tests in block["results"].items():
            for test, by_metric in tests.items():
                for m, stats in by_metric.items():
                    out[f"{prefix}{variant}/{test}/{m}_mean"] = stats["mean"]
                    if stats["std"] is not None:
                        out[f"{prefix}{variant}/{test}/{m}_std"] = stats["std"]
        for gain in block["gains"]:
            key = gain["key"] if gain["kind"] == "test" else f"{gain['key']}/{gain['test']}"
            for m in METRICS:
                out[f"{prefix}gain/{key}/{m}_mean"] = gain[m]["mean"]
                if gain[m]["std"] is not None:
                    out[f"{prefix}gain/{key}/{m}_std"] = gain[m]["std"]
    return out
