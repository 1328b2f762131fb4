"""The Tracker: a queue on the calling side, one worker thread on the other, and the local record
(metrics.jsonl, run.json) in between. The guarantees are in the package docstring (pipeline.tracking)."""
from __future__ import annotations

import atexit
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, Metric
from mlflow.exceptions import MlflowException

from pipeline.config import TrackingConfig
from pipeline.fileio import atomic_write

from .datasets import dataset_input, input_context
from .environment import environment_tags
from .fallback import write_fallback
from .names import (MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VAL_LENGTH,
                    clean_key, clip_value, default_run_name, plain, resolve_tracking_uri, unflatten)
from .system import SystemSampler
from .store import (PERMANENT_ERRORS, ModelUpload, log_inputs, log_params, open_run, register_model, send_model,
                    upload_artifact)

logger = logging.getLogger("pipeline.tracking")

STATUSES = ("FINISHED", "FAILED", "KILLED")
_RETRY_DELAY_S = 0.5              # first retry delay, and the delay while finish() waits
_MAX_RETRY_DELAY_S = 30.0
_FINISH_CAP_FACTOR = 6            # finish() waits at most this many timeout_s in all


@dataclass
class _Op:
    """One queued MLflow call. kind: start | params | inputs | metrics | artifact | model | register |
    terminate."""
    kind: str
    data: Any



class Tracker:
    """MLflow run of one training; see the module docstring for the guarantees.

    Files (main rank, under <output_dir>/tracking/): metrics.jsonl (every metric, always), run.json
    (run id and store), config.yaml (the resolved config), fallback.db + fallback-artifacts/ (only
    when the store could not take everything), staging/ (artifact snapshots waiting to be sent).
    """

    def __init__(self, tracking_cfg: TrackingConfig, *, is_main: bool, output_dir: str | Path):
        self.cfg = tracking_cfg
        self.active = bool(is_main and tracking_cfg.enabled)
        self.tracking_uri = resolve_tracking_uri(tracking_cfg.uri) if self.active else None
        self.dir = Path(output_dir) / "tracking"
        self.run_id: str | None = None            # best-known id: the resumed one, then the store's
        self.run_name: str | None = None          # the name a new run gets (start)
        self.fallback_uri: str | None = None
        self._state = "new"                      # new -> running -> finished
        self._ops: deque[_Op] = deque()
        self._cond = threading.Condition()
        self._wake = threading.Event()           # cut a retry wait short (finish, abandon)
        self._abandon = threading.Event()        # finish gave up on the store: stop the worker
        self._started = threading.Event()        # the run exists, or the first attempt failed
        self._opened = False                     # the store has confirmed or created the run
        self._finishing = False
        self._progress = time.monotonic()        # when the worker last completed a call
        self._down = False
        self._warned = False
        self._dropped = 0                        # calls the store refused for good
        self._existing_params: dict[str, str] = {}
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._artifacts: list[tuple[Path, str | None]] = []
        self._inputs: list[DatasetInput] = []
        self._latest: dict[str, Metric] = {}     # each metric's last recorded point
        self._models: list[ModelUpload] = []
        self._seq = 0
        self._last_step = 0
        self._record_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._jsonl: TextIO | None = None
        self._client: MlflowClient | None = None
        self._sampler: SystemSampler | None = None

    # ---------------------------------------------------------------------------------------------
    # Public API
    # ---------------------------------------------------------------------------------------------
    def start(self, params: dict[str, Any], tags: dict[str, Any] | None = None,
              run_id: str | None = None, run_name: str | None = None) -> str | None:
        """Open the run (or continue `run_id`), queue params, tags and config.yaml.

        A new run is named tracking.run_name, else `run_name`, else `<experiment>-<time>-<hex>`
        (names.default_run_name; never MLflow's generator, which the seeded `random` drives).
        Returns the run id once the run exists, waiting at most tracking.timeout_s. When the store
        does not answer in time it returns `run_id` (the resumed run, continued once the store is back)
        or None (a new run is created in the background; read `self.run_id` later). None off the main
        rank and when tracking is disabled."""
        if not self.active:
            return None
        if self._state != "new":
            raise RuntimeError("Tracker.start() was already called; use one Tracker per training run")
        config_text = yaml.safe_dump(plain(unflatten(params)), sort_keys=False)
        self._state = "running"
        self.run_id = run_id
        self.run_name = self.cfg.run_name or run_name or default_run_name(self.cfg.experiment)
        # One short attempt per call (these variables are read by MLflow's HTTP client at each
        # request): the worker does the retrying, without blocking anyone.
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, math.ceil(self.cfg.timeout_s)))
        self.dir.mkdir(parents=True, exist_ok=True)
        config_path = self.dir / "config.yaml"
        atomic_write(config_path, config_text)
        self._params = {clean_key(k): clip_value(v, MAX_PARAM_VAL_LENGTH) for k, v in params.items()}
        all_tags = {**environment_tags(), **(tags or {})}
        self._tags = {clean_key(k): clip_value(v, MAX_TAG_VAL_LENGTH) for k, v in all_tags.items()}
        self._jsonl = open(self.dir / "metrics.jsonl", "a", encoding="utf-8")

        self._enqueue(_Op("start", run_id))
        items = list(self._params.items())
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self._enqueue(_Op("params", dict(items[i:i + MAX_PARAMS_TAGS_PER_BATCH])))
        self._queue_artifact(config_path, None)

        threading.Thread(target=self._work, name="mlflow-tracker", daemon=True).start()
        if self.cfg.system_metrics:
            interval = float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL") or 10.0)
            self._sampler = SystemSampler(self._record, lambda: self._last_step, interval)
        atexit.register(self._at_exit)
        self._started.wait(self.cfg.timeout_s)
        return self.run_id

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """Record metrics at `step` (appended to metrics.jsonl now, sent to MLflow in the background).
        Values must be numbers (or one-element tensors)."""
        if not self.active:
            return
        self._require_running("log_metrics")
        values = {}
        for name, value in metrics.items():
            try:
                values[clean_key(name)] = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"Tracker.log_metrics: metric '{name}' is {value!r}; expected a number") from None
        self._last_step = int(step)
        self._record(values, int(step))

    def log_datasets(self, datasets: list[dict[str, Any]]) -> None:
        """Record the training's data as the run's MLflow dataset inputs (pipeline.tracking.datasets),
        in the background like every call. `datasets`: what pipeline.data.shard_set_inputs returns,
        one dict per input with name, location, manifest_sha256, profile and context ("training" or
        "evaluation"). Metrics that log_model links to the model refer to the evaluation input."""
        if not self.active:
            return
        self._require_running("log_datasets")
        inputs = [dataset_input(d["name"], d["location"], d["manifest_sha256"], d["profile"], d["context"])
                  for d in datasets]
        if inputs:
            self._inputs.extend(inputs)
            self._enqueue(_Op("inputs", inputs))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Queue a file or directory for upload as <artifact_path>/<its name>. It is copied now
        (local disk), so the caller may overwrite or delete it afterwards."""
        if not self.active:
            return
        self._require_running("log_artifact")
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"Tracker.log_artifact: '{path}' does not exist")
        staged = self._stage_dir() / path.resolve().name
        if path.is_dir():
            shutil.copytree(path, staged)
        else:
            shutil.copy2(path, staged)
        self._queue_artifact(staged, artifact_path)

    def log_model(self, weights: dict[str, Any], config: dict[str, Any], num_classes: int,
                  metrics: dict[str, float] | None = None) -> None:
        """Log the trained network as the run's MLflow model; a no-op when tracking.log_model is false.

        weights: the fp32 CPU state dict of the evaluated network (pipeline.serving.eval_state_dict);
        config: the resolved config (Config.to_dict()); num_classes: the classifier's size;
        metrics: {key: value} measured on this network (the final evaluation, e.g. eval/rank1), linked
        to the logged model (`mlflow.get_logged_model(id).metrics`) and to the evaluation dataset
        input when log_datasets recorded one. A key whose last recorded value is this one links that
        point; otherwise the value is recorded now.
        Saved now, to local disk, as an MLflow pyfunc model of weights-only files and code (no pickle;
        see pipeline.serving), after checking that it rebuilds: a mismatch between weights and config
        raises here. Then queued: the worker makes it the run's logged model 'model'
        (`runs:/<run_id>/model`) and, with tracking.register_as, a new version of that registered
        model. If the store cannot take it, it goes to the fallback store with the run."""
        if not self.active or not self.cfg.log_model:
            return
        self._require_running("log_model")
        from pipeline.serving import save_pyfunc_model

        target = self._stage_dir() / "model"
        info = save_pyfunc_model(target, weights, config, num_classes)
        params = {k: clip_value(info[k], MAX_PARAM_VAL_LENGTH)
                  for k in ("backbone", "num_classes", "feature_dim", "image_size")}
        linked = []
        for key, value in (metrics or {}).items():
            key, value = clean_key(key), float(value)
            if key not in self._latest or self._latest[key].value != value:
                self._record({key: value}, self._last_step)
            linked.append(self._latest[key])
        evaluated = next(((i.dataset.name, i.dataset.digest) for i in self._inputs
                          if input_context(i) == "evaluation"), None)
        upload = ModelUpload(target, self._last_step, params, self.cfg.register_as, metrics=linked,
                             dataset=evaluated)
        self._models.append(upload)
        self._enqueue(_Op("model", upload))
        if upload.register_as:
            self._enqueue(_Op("register", upload))

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with `status` (FINISHED | FAILED | KILLED).

        Waits while the store keeps accepting calls, but never more than tracking.timeout_s without
        progress nor 6 x timeout_s in all; whatever is left is written, with the complete run, to the
        local fallback store, whose location is logged."""
        if status not in STATUSES:
            raise ValueError(f"Tracker.finish: status {status!r} must be one of {list(STATUSES)}")
        if not self.active or self._state != "running":
            return
        self._state = "finished"
        atexit.unregister(self._at_exit)
        if self._sampler is not None:
            self._sampler.stop()
        self._enqueue(_Op("terminate", status))
        sent = self._drain()
        if not sent:
            self._abandon.set()
            self._wake.set()
            with self._cond:
                self._cond.notify_all()
        if not sent or self._dropped:
            self._write_fallback(status)
        else:
            shutil.rmtree(self.dir / "staging", ignore_errors=True)
        self._jsonl.close()

    # ---------------------------------------------------------------------------------------------
    # Calling side
    # ---------------------------------------------------------------------------------------------
    def _require_running(self, what: str) -> None:
        if self._state != "running":
            when = "before start()" if self._state == "new" else "after finish()"
            raise RuntimeError(f"Tracker.{what}() called {when}")

    def _record(self, values: dict[str, float], step: int) -> None:
        timestamp = int(time.time() * 1000)
        with self._record_lock:
            self._jsonl.write(json.dumps({"step": step, "timestamp": timestamp, "metrics": values}) + "\n")
            self._jsonl.flush()
        entries = [Metric(k, v, timestamp, step) for k, v in values.items()]
        self._latest.update((m.key, m) for m in entries)
        for i in range(0, len(entries), MAX_METRICS_PER_BATCH):
            self._enqueue(_Op("metrics", entries[i:i + MAX_METRICS_PER_BATCH]))

    def _stage_dir(self) -> Path:
        """A new, empty directory for one artifact (unique also across resumed sessions)."""
        with self._record_lock:
            self._seq += 1
            seq = self._seq
        (self.dir / "staging").mkdir(exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{seq:05d}-", dir=self.dir / "staging"))

    def _queue_artifact(self, path: Path, artifact_path: str | None) -> None:
        self._artifacts.append((path, artifact_path))
        self._enqueue(_Op("artifact", (path, artifact_path)))

    def _enqueue(self, op: _Op) -> None:
        with self._cond:
            self._ops.append(op)
            self._cond.notify_all()

    def _drain(self) -> bool:
        """Wait for the queue to empty; False when the store stalls (see finish)."""
        timeout = self.cfg.timeout_s
        give_up = time.monotonic() + _FINISH_CAP_FACTOR * timeout
        with self._cond:
            self._finishing = True
            self._progress = time.monotonic()
            self._wake.set()
            while self._ops:
                now = time.monotonic()
                deadline = min(give_up, self._progress + timeout)
                if now >= deadline:
                    return False
                self._cond.wait(deadline - now)
        return True

    def _at_exit(self) -> None:
        logger.warning("MLflow run %s: the process is exiting without Tracker.finish(); marking it FAILED",
                       self.run_id)
        self.finish("FAILED")

    # ---------------------------------------------------------------------------------------------
    # Worker side
    # ---------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while (op := self._next_op()) is not None:
            delay = _RETRY_DELAY_S
            while True:
                try:
                    self._apply(op)
                    break
                except MlflowException as exc:
                    if exc.error_code not in PERMANENT_ERRORS:
                        self._failed(op, exc)
                    else:
                        self._dropped += 1
                        self._warn_once("MLflow at %s refused a '%s' call for good (%s); it is kept in %s "
                                        "and will be in the fallback store", self.tracking_uri, op.kind,
                                        exc, self.dir)
                        break
                except Exception as exc:  # network, database or filesystem trouble: retry later
                    self._failed(op, exc)
                if op.kind == "start":
                    self._started.set()
                self._wake.wait(_RETRY_DELAY_S if self._finishing else delay)
                self._wake.clear()
                if self._abandon.is_set():
                    return
                delay = min(2 * delay, _MAX_RETRY_DELAY_S)
            if op.kind == "start":
                self._started.set()
            with self._cond:
                self._ops.popleft()
                self._progress = time.monotonic()
                self._cond.notify_all()

    def _next_op(self) -> _Op | None:
        """The head of the queue (left there until done), with following metric calls merged in."""
        with self._cond:
            while not self._ops and not self._abandon.is_set():
                self._cond.wait()
            if self._abandon.is_set():
                return None
            op = self._ops[0]
            if op.kind == "metrics":
                merged = list(op.data)
                while (len(self._ops) > 1 and self._ops[1].kind == "metrics"
                       and len(merged) + len(self._ops[1].data) <= MAX_METRICS_PER_BATCH):
                    merged.extend(self._ops[1].data)
                    del self._ops[1]
                op = self._ops[0] = _Op("metrics", merged)
            return op

    def _failed(self, op: _Op, exc: Exception) -> None:
        self._down = True
        self._warn_once("MLflow tracking at %s is not answering (%s: %s). Training goes on; metrics are "
                        "kept in %s and sent when it is back, or written to a local fallback store at the end",
                        self.tracking_uri, type(exc).__name__, str(exc)[:300], self.dir / "metrics.jsonl")

    def _warn_once(self, msg: str, *args) -> None:
        if not self._warned:
            self._warned = True
            logger.warning(msg, *args)
        else:
            logger.debug(msg, *args)

    def _apply(self, op: _Op) -> None:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        client = self._client
        if op.kind == "start":
            self._open_run(client, op.data)
        elif not self._opened:
            raise MlflowException(f"no MLflow run to receive the '{op.kind}' call",
                                  error_code="RESOURCE_DOES_NOT_EXIST")
        elif op.kind == "params":
            log_params(client, self.run_id, op.data, self._existing_params)
        elif op.kind == "inputs":
            log_inputs(client, self.run_id, op.data)
        elif op.kind == "metrics":
            client.log_batch(self.run_id, metrics=op.data)
        elif op.kind == "artifact":
            upload_artifact(client, self.run_id, *op.data)
        elif op.kind == "model":
            send_model(client, self.run_id, op.data)
        elif op.kind == "register":
            register_model(client, self.run_id, op.data)
        elif op.kind == "terminate":
            client.set_terminated(self.run_id, op.data)
        if self._down:
            self._down = False
            logger.info("MLflow tracking at %s answers again; sending what was held", self.tracking_uri)

    def _open_run(self, client: MlflowClient, resume_id: str | None) -> None:
        run, self._existing_params = open_run(client, self.cfg.experiment, self.run_name, self._tags,
                                              resume_id, self.tracking_uri)
        self.run_id = run.info.run_id
        self._opened = True
        self._update_state(tracking_uri=self.tracking_uri, experiment=self.cfg.experiment, run_id=self.run_id)

    # ---------------------------------------------------------------------------------------------
    # Local state and fallback
    # ---------------------------------------------------------------------------------------------
    def _update_state(self, **fields) -> None:
        with self._state_lock:
            path = self.dir / "run.json"
            state = json.loads(path.read_text()) if path.is_file() else {}
            state.update(fields)
            atomic_write(path, json.dumps(state, indent=2) + "\n")

    def _write_fallback(self, status: str) -> None:
        tags = {**self._tags, "primary_tracking_uri": self.tracking_uri, "primary_run_id": self.run_id or "none"}
        written = write_fallback(self.dir, experiment=self.cfg.experiment, run_name=self.run_name, tags=tags,
                                 params=self._params, artifacts=self._artifacts, models=self._models,
                                 status=status, inputs=self._inputs)
        if written is None:
            return
        uri, run_id, lines = written
        self.fallback_uri = uri
        self._update_state(fallback_uri=uri, fallback_run_id=run_id, fallback_lines=lines)
        logger.warning("MLflow tracking at %s did not take everything; the complete run is in the local "
                       "store %s (run %s). View it with: mlflow ui --backend-store-uri %s",
                       self.tracking_uri, uri, run_id, uri)
