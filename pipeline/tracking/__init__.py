"""MLflow tracking: rank 0 records a training's run, nothing here can stall training, and runs are
compared afterwards.

    tracker.py      Tracker: the calling side (never blocks) and the worker thread that talks to MLflow
    store.py        the MLflow calls: open/continue a run, params, artifacts, the logged model, registry
    fallback.py     the whole run into a local sqlite store when the tracking store could not take it
    names.py        keys and values MLflow accepts, MLflow's limits, default run names
    datasets.py     the training's shard sets as MLflow dataset inputs (mlflow.data)
    environment.py  tags: versions, host, git commit
    system.py       system metrics (psutil, nvidia-ml-py)
    compare.py      compare the runs of an experiment (reid-compare)

Only MLflow's public API is used (mlflow.MlflowClient, mlflow.entities, mlflow.exceptions).

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
    run_id = tracker.start(params=cfg.flat(), tags={"world_size": "2"}, run_id=resumed,
                           run_name=default_run_name(cfg.tracking.experiment, "ddp", "w2"))
    tracker.log_datasets(shard_set_inputs(cfg.data.shards, cfg.eval.shards))   # pipeline.data
    tracker.log_metrics({"loss/total": 1.2, "lr": 2e-4}, step=global_step)
    tracker.log_artifact("outputs/run/plots/cmc.png", artifact_path="plots")
    tracker.log_model(eval_state_dict(model), cfg.to_dict(), num_classes,      # pipeline.serving
                      metrics={"eval/mAP": 0.81})                              # linked to the model
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
from .environment import environment_tags
from .names import DEFAULT_TRACKING_URI, clean_key, clip_value, default_run_name, resolve_tracking_uri, unflatten
from .tracker import STATUSES, Tracker

__all__ = ["DEFAULT_TRACKING_URI", "STATUSES", "Tracker", "clean_key", "clip_value", "default_run_name",
           "environment_tags", "resolve_tracking_uri", "unflatten"]
