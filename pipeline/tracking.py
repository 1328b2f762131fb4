"""MLflow tracking for training runs: rank 0 records everything, and nothing here can stall training.

A tracking server is a remote dependency that a multi-day, multi-node job must not depend on. So:

* Only the main rank talks to MLflow; on every other rank each method is a no-op.
* Every public method returns at once (``start`` waits at most ``tracking.timeout_s`` for the run to
  exist). The MLflow calls happen on one background thread that drains a queue in order, batching
  metrics into ``log_batch`` requests. MLflow's own HTTP client would retry 7 times with a 120 s
  timeout; here it makes one attempt bounded by ``timeout_s`` (``start`` sets
  MLFLOW_HTTP_REQUEST_MAX_RETRIES=0 and MLFLOW_HTTP_REQUEST_TIMEOUT=timeout_s in the main rank's
  process) and the thread retries with backoff.
* When the store fails, it says so once, keeps the unsent calls and sends them when the store is back.
* ``finish`` waits a bounded time. If something could not be sent by then, the whole run (params,
  every metric, artifacts, status) is written to a local fallback store,
  ``sqlite:///<output_dir>/tracking/fallback.db``, and its location is printed.
* ``<output_dir>/tracking/metrics.jsonl`` is the source of truth: every metric is appended there
  before MLflow is tried.

A resumed training passes its run id to ``start`` and continues that run: same id, metrics appended.

Usage (see docs/interfaces.md)::

    tracker = Tracker(cfg.tracking, is_main=dist.is_main, output_dir=cfg.output_dir)
    run_id = tracker.start(params=cfg.flat(), tags={"world_size": "2"}, run_id=resumed)
    tracker.log_metrics({"loss/total": 1.2, "lr": 2e-4}, step=global_step)
    tracker.log_artifact("outputs/run/plots/cmc.png", artifact_path="plots")
    tracker.log_model(eval_state_dict(model), cfg.to_dict(), num_classes)   # pipeline.serving
    tracker.finish("FINISHED")

When the store does not answer within ``timeout_s``, ``start`` returns the resumed run id, or None
for a new run, which is then created in the background: ``tracker.run_id`` always holds the best-known
id, so that is the one to save in checkpoints.

The model (``log_model``) is an MLflow 3 *logged model* named ``model``, linked to the run as its
output: the run's Models tab lists it, ``mlflow.pyfunc.load_model("runs:/<run_id>/model")`` loads it
(MLflow 3 resolves ``runs:/<run_id>/<name>`` to the logged model of that name whose source run is
<run_id>, the newest if several) and ``mlflow models serve`` serves it. It is weights and code, no
pickle: see pipeline.serving. Its files are the logged model's, not the run's own artifacts:
``client.list_logged_model_artifacts(model_id)`` lists them (``client.list_artifacts(run_id, "model")``
too, but MLflow 3.17 resolves that through the process-wide tracking URI, not the client's).
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import math
import os
import platform
import posixpath
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
    path_not_unique,
    validate_param_and_metric_name,
)

from pipeline.config import TrackingConfig
from pipeline.fileio import atomic_write

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
STATUSES = ("FINISHED", "FAILED", "KILLED")
# Errors that retrying cannot fix (bad request, missing run, ...): the call is dropped from the
# MLflow side (it stays in the local record and goes to the fallback store).
_PERMANENT_ERRORS = frozenset({
    "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE",
    "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED", "ENDPOINT_NOT_FOUND",
})
_RETRY_DELAY_S = 0.5              # first retry delay, and the delay while finish() waits
_MAX_RETRY_DELAY_S = 30.0
_FINISH_CAP_FACTOR = 6            # finish() waits at most this many timeout_s in all
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


# --------------------------------------------------------------------------------------------------
# Names and values MLflow accepts
# --------------------------------------------------------------------------------------------------
def resolve_tracking_uri(uri: str | None) -> str:
    """tracking.uri if set, else $MLFLOW_TRACKING_URI, else MLflow's embedded sqlite:///mlflow.db."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def clean_key(name: Any) -> str:
    """A param/metric/tag key MLflow accepts: invalid characters become '_', at most 250 chars."""
    key = str(name)
    if validate_param_and_metric_name(key) and not path_not_unique(key) and 0 < len(key) <= MAX_ENTITY_KEY_LENGTH:
        return key
    key = _BAD_KEY_CHARS.sub("_", key).replace("/", "_")[:MAX_ENTITY_KEY_LENGTH]
    return key if key and not path_not_unique(key) else ("_" + key)[:MAX_ENTITY_KEY_LENGTH]


def clip_value(value: Any, limit: int) -> str:
    """str(value) ('None' for None), truncated to `limit` chars with a note saying so."""
    text = "None" if value is None else str(value)
    if len(text) <= limit:
        return text
    note = f"...[truncated from {len(text)} chars; full value in config.yaml]"
    return text[: limit - len(note)] + note


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """Inverse of pipeline.config.flatten: {'a.b': 1} -> {'a': {'b': 1}}."""
    tree: dict[str, Any] = {}
    for dotted, value in flat.items():
        *parents, leaf = str(dotted).split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"params: key '{dotted}' nests under '{part}', which is a value")
        node[leaf] = value
    return tree


def _plain(value: Any) -> Any:
    """Make a params value safe for yaml.safe_dump (unknown types become their str())."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _upload(client: MlflowClient, run_id: str, path: Path, artifact_path: str | None) -> None:
    """A file goes to <artifact_path>/<name>; a directory too, with its contents below it."""
    if path.is_dir():
        client.log_artifacts(run_id, str(path), posixpath.join(artifact_path or "", path.name))
    else:
        client.log_artifact(run_id, str(path), artifact_path)


# --------------------------------------------------------------------------------------------------
# Tags
# --------------------------------------------------------------------------------------------------
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment_tags() -> dict[str, str]:
    """torch / CUDA / Python versions, host, and the git commit of this code when it is a checkout."""
    import torch

    tags = {
        "torch.version": torch.__version__,
        "cuda.version": torch.version.cuda or "none",
        "python.version": platform.python_version(),
        "host": platform.node(),
        "mlflow.source.name": sys.argv[0] if sys.argv and sys.argv[0] else "python",
    }
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        tags["git.dirty"] = "unknown" if dirty is None else str(bool(dirty)).lower()
    return tags


# --------------------------------------------------------------------------------------------------
# Tracker
# --------------------------------------------------------------------------------------------------
@dataclass
class _Op:
    """One queued MLflow call. kind: start | params | metrics | artifact | model | register | terminate."""
    kind: str
    data: Any


@dataclass
class _ModelUpload:
    """A model saved at log_model time, on its way to becoming the run's logged model. The ids are
    kept so that a retried call continues where the failed one stopped (no second logged model)."""
    path: Path
    step: int
    params: dict[str, str]
    register_as: str | None
    model_id: str | None = None
    linked: bool = False
    sent: bool = False


MODEL_TYPE = "alignedreid-embedder"
_EXISTS = ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS")


def _send_model(client: MlflowClient, run_id: str, upload: _ModelUpload) -> None:
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
    upload.sent = True


def _register_model(client: MlflowClient, run_id: str, upload: _ModelUpload) -> str | None:
    """A new version of the registered model `upload.register_as` from the logged model (creating
    the registered model the first time). Returns the version, or None when the registry refuses
    for good (logged as a warning: registration is a convenience, never a reason to fail).
    Store trouble (no answer) raises, so that the caller retries."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

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
        versions = json.loads(tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
        if {"name": name, "version": str(version.version)} not in versions:
            versions.append({"name": name, "version": str(version.version)})
            client.set_logged_model_tags(upload.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(versions)})
    except MlflowException as exc:
        if exc.error_code not in _PERMANENT_ERRORS:
            raise
        logger.warning("MLflow: could not register the model as '%s' (%s); it stays logged in run %s",
                       name, exc, run_id)
        return None
    logger.info("MLflow: registered the model as '%s' version %s", name, version.version)
    return str(version.version)


class _SystemSampler:
    """Samples CPU, memory, disk, network and (with nvidia-ml-py and a GPU) GPU use every `interval`
    seconds and hands them to the tracker as 'system/...' metrics at the latest training step, so
    they travel the same never-blocking path as every other metric."""

    def __init__(self, tracker: "Tracker", interval: float):
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

        self.monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        try:
            self.monitors.append(GPUMonitor())
        except (ImportError, RuntimeError) as exc:
            logger.info("system metrics: no GPU metrics (%s)", exc)
        self.tracker, self.interval = tracker, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlflow-system-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            values: dict[str, float] = {}
            for monitor in self.monitors:
                monitor.collect_metrics()
                values.update(monitor.aggregate_metrics())
                monitor.clear_metrics()
            self.tracker._record({f"system/{k}": v for k, v in values.items()}, self.tracker._last_step)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


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
        self._models: list[_ModelUpload] = []
        self._seq = 0
        self._last_step = 0
        self._record_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._jsonl: TextIO | None = None
        self._client: MlflowClient | None = None
        self._sampler: _SystemSampler | None = None

    # ---------------------------------------------------------------------------------------------
    # Public API
    # ---------------------------------------------------------------------------------------------
    def start(self, params: dict[str, Any], tags: dict[str, Any] | None = None,
              run_id: str | None = None) -> str | None:
        """Open the run (or continue `run_id`), queue params, tags and config.yaml.

        Returns the run id once the run exists, waiting at most tracking.timeout_s. When the store
        does not answer in time it returns `run_id` (the resumed run, continued once the store is back)
        or None (a new run is created in the background; read `self.run_id` later). None off the main
        rank and when tracking is disabled."""
        if not self.active:
            return None
        if self._state != "new":
            raise RuntimeError("Tracker.start() was already called; use one Tracker per training run")
        config_text = yaml.safe_dump(_plain(unflatten(params)), sort_keys=False)
        self._state = "running"
        self.run_id = run_id
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
            self._sampler = _SystemSampler(self, interval)
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

    def log_model(self, weights: dict[str, Any], config: dict[str, Any], num_classes: int) -> None:
        """Log the trained network as the run's MLflow model; a no-op when tracking.log_model is false.

        weights: the fp32 CPU state dict of the evaluated network (pipeline.serving.eval_state_dict);
        config: the resolved config (Config.to_dict()); num_classes: the classifier's size.
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
        upload = _ModelUpload(target, self._last_step, params, self.cfg.register_as)
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
            raise RuntimeError(f"Tracker.{what}() called {'before start()' if self._state == 'new' else 'after finish()'}")

    def _record(self, values: dict[str, float], step: int) -> None:
        timestamp = int(time.time() * 1000)
        with self._record_lock:
            self._jsonl.write(json.dumps({"step": step, "timestamp": timestamp, "metrics": values}) + "\n")
            self._jsonl.flush()
        entries = [Metric(k, v, timestamp, step) for k, v in values.items()]
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
                    if exc.error_code not in _PERMANENT_ERRORS:
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
            self._log_params(client, op.data)
        elif op.kind == "metrics":
            client.log_batch(self.run_id, metrics=op.data)
        elif op.kind == "artifact":
            _upload(client, self.run_id, *op.data)
        elif op.kind == "model":
            _send_model(client, self.run_id, op.data)
        elif op.kind == "register":
            _register_model(client, self.run_id, op.data)
        elif op.kind == "terminate":
            client.set_terminated(self.run_id, op.data)
        if self._down:
            self._down = False
            logger.info("MLflow tracking at %s answers again; sending what was held", self.tracking_uri)

    def _open_run(self, client: MlflowClient, resume_id: str | None) -> None:
        run = None
        if resume_id:
            try:
                run = client.get_run(resume_id)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                logger.warning("MLflow run %s (to resume) is not in %s; starting a new run",
                               resume_id, self.tracking_uri)
        if run is not None:
            client.update_run(resume_id, status="RUNNING")
            client.log_batch(resume_id, tags=[RunTag(k, v) for k, v in self._tags.items()])
            self._existing_params = dict(run.data.params)
        else:
            experiment = client.get_experiment_by_name(self.cfg.experiment)
            if experiment is None:
                try:
                    experiment_id = client.create_experiment(self.cfg.experiment)
                except MlflowException as exc:  # another job created it in the meantime
                    if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    experiment_id = client.get_experiment_by_name(self.cfg.experiment).experiment_id
            else:
                experiment_id = experiment.experiment_id
            tags = dict(self._tags)
            if resume_id:
                tags["resumed_from_run_id"] = resume_id
            run = client.create_run(experiment_id, run_name=self.cfg.run_name, tags=tags)
        self.run_id = run.info.run_id
        self._opened = True
        self._update_state(tracking_uri=self.tracking_uri, experiment=self.cfg.experiment, run_id=self.run_id)

    def _log_params(self, client: MlflowClient, params: dict[str, str]) -> None:
        # MLflow refuses to change a logged param, which a resumed run may try (e.g. more epochs).
        changed = [k for k, v in params.items() if k in self._existing_params and self._existing_params[k] != v]
        if changed:
            logger.warning("MLflow run %s: params %s differ from the run being resumed; the first "
                           "values are kept (config.yaml has the new ones)", self.run_id, changed)
            client.set_tag(self.run_id, "params_changed_on_resume", clip_value(changed, MAX_TAG_VAL_LENGTH))
        new = [Param(k, v) for k, v in params.items() if k not in self._existing_params]
        if new:
            client.log_batch(self.run_id, params=new)

    # ---------------------------------------------------------------------------------------------
    # Local state and fallback
    # ---------------------------------------------------------------------------------------------
    def _update_state(self, **fields) -> None:
        with self._state_lock:
            path = self.dir / "run.json"
            state = json.loads(path.read_text()) if path.is_file() else {}
            state.update(fields)
            atomic_write(path, json.dumps(state, indent=2) + "\n")

    def _read_metrics(self, skip: int) -> tuple[list[Metric], int]:
        """Metrics from metrics.jsonl after the first `skip` lines; also the number of lines."""
        path = self.dir / "metrics.jsonl"
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

    def _write_fallback(self, status: str) -> None:
        """Write the complete run to the local fallback store (appending to this training's earlier
        fallback run, if any)."""
        db = (self.dir / "fallback.db").resolve()
        uri = f"sqlite:///{db}"
        try:
            client = MlflowClient(tracking_uri=uri)
            experiment = client.get_experiment_by_name(self.cfg.experiment)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(
                self.cfg.experiment, artifact_location=(self.dir / "fallback-artifacts").resolve().as_uri())
            state = json.loads((self.dir / "run.json").read_text()) if (self.dir / "run.json").is_file() else {}
            run_id, skip = state.get("fallback_run_id"), state.get("fallback_lines", 0)
            if run_id:
                client.update_run(run_id, status="RUNNING")
                existing = client.get_run(run_id).data.params
            else:
                tags = {**self._tags, "primary_tracking_uri": self.tracking_uri,
                        "primary_run_id": self.run_id or "none"}
                run_id = client.create_run(experiment_id, run_name=self.cfg.run_name, tags=tags).info.run_id
                existing, skip = {}, 0
            params = [Param(k, v) for k, v in self._params.items() if k not in existing]
            for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
                client.log_batch(run_id, params=params[i:i + MAX_PARAMS_TAGS_PER_BATCH])
            metrics, lines = self._read_metrics(skip)
            for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                client.log_batch(run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH])
            for path, artifact_path in self._artifacts:
                _upload(client, run_id, path, artifact_path)
            for upload in self._models:
                copy = dataclasses.replace(upload, model_id=None, linked=False, sent=False)
                _send_model(client, run_id, copy)
                if copy.register_as:
                    try:
                        _register_model(client, run_id, copy)
                    except Exception as exc:
                        logger.warning("MLflow: could not register the model as '%s' in the fallback "
                                       "store (%s)", copy.register_as, exc)
            client.set_terminated(run_id, status)
        except Exception as exc:
            logger.error("MLflow: writing the fallback store %s failed (%s); every metric is still in %s",
                         uri, exc, self.dir / "metrics.jsonl")
            return
        self.fallback_uri = uri
        self._update_state(fallback_uri=uri, fallback_run_id=run_id, fallback_lines=lines)
        logger.warning("MLflow tracking at %s did not take everything; the complete run is in the local "
                       "store %s (run %s). View it with: mlflow ui --backend-store-uri %s",
                       self.tracking_uri, uri, run_id, uri)
