"""MLflow tracking of a real training: launch/train.py under torchrun, 2 gloo processes, tiny shards.

- with an embedded store: exactly one run, with the resolved config as params and config.yaml,
  per-step losses / lr / throughput, final rank1 / mAP / mINP, evaluation plots, FINISHED, the shard
  set as dataset inputs (training and evaluation: name, manifest digest, location, profile), and the
  trained network as the run's MLflow 3 logged model (`runs:/<run_id>/model`, the final checkpoint's
  weights) with the final evaluation's metrics linked to it;
- pointed at a closed port: the training finishes all the same, warns once, and the complete run
  (inputs and linked metrics included) is in the fallback store afterwards; without tracking.run_name
  the run is named <experiment>-<engine>-w<world>-<time>-<hex>.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus

from pipeline.data import load_manifest, manifest_sha256
from pipeline.inference import FeatureExtractor
from pipeline.tracking.datasets import input_context

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(shards: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """One epoch of 4 steps (logged every 2) on 2 ranks, evaluation at the end."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "0", "--monitor-interval", "0.5", str(ROOT / "launch/train.py"),
           "--config", str(ROOT / "configs/test.yaml"), f"data.shards={shards}", f"output_dir={out}",
           "train.epochs=1", "checkpoint.every_steps=0", "eval.plots=true", *overrides]
    # cwd: the embedded store keeps its artifacts in ./mlruns, as MLflow does
    proc = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"
    return proc


def all_artifacts(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= all_artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def check_run(client: MlflowClient, uri: str, run, out: Path, shards: Path) -> None:
    """What every tracked training must leave in its run (in the store at `uri`)."""
    config = run.data.params
    assert run.info.status == "FINISHED"
    assert config["model.backbone"] == "resnet18" and config["data.p"] == "4"
    assert config["output_dir"] == str(out) and config["model.pretrained"] == "None"
    assert run.data.tags["world_size"] == "2" and "torch.version" in run.data.tags
    assert "dataset_manifest_sha256" in run.data.tags
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss/total")) == [2, 4]
    for key in ("lr", "throughput/images_per_s", "time/data_wait_share", "loss/id", "loss/global_triplet"):
        assert key in run.data.metrics, key
    summary = json.loads((out / "summary.json").read_text())["final_metrics"]
    for name in ("rank1", "rank5", "mAP", "mINP"):
        assert run.data.metrics[f"eval/{name}"] == pytest.approx(summary[name])
    artifacts = all_artifacts(client, run.info.run_id)
    assert "config.yaml" in artifacts
    assert {"eval/epoch-0001/cmc.png", "eval/epoch-0001/ranked_lists.png", "eval/epoch-0001/alignment.png"} <= artifacts
    # The model is the run's logged model 'model' (MLflow 3), not a run artifact; it holds the weights
    # of the last checkpoint.
    (model,) = [m for m in client.search_logged_models([run.info.experiment_id])
                if m.source_run_id == run.info.run_id]
    assert (model.name, model.status) == ("model", LoggedModelStatus.READY)
    assert "MLmodel" in {a.path for a in client.list_logged_model_artifacts(model.model_id)}
    logged = FeatureExtractor(f"runs:/{run.info.run_id}/model", tracking_uri=uri)
    images = torch.rand(3, 3, 64, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logged(images), FeatureExtractor(out / "checkpoints")(images))
    check_data_and_model_metrics(client, run, model.model_id, shards, summary)


def check_data_and_model_metrics(client: MlflowClient, run, model_id: str, shards: Path, summary: dict) -> None:
    """The shard set is the run's dataset input twice (train split: training; query+gallery:
    evaluation); the final evaluation's metrics are linked to the logged model and to that input."""
    digest = manifest_sha256(shards)[:32]
    inputs = {input_context(i): i.dataset for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["evaluation", "training"]
    manifest = load_manifest(shards)
    for context, part in (("training", "train"), ("evaluation", "query+gallery")):
        dataset = inputs[context]
        assert dataset.name == f"{shards.name}/{part}"
        assert dataset.digest == digest and dataset.source_type == "reid-shards"
        assert json.loads(dataset.source) == {"uri": str(shards)}
        profile = json.loads(dataset.profile)
        assert profile["num_classes"] == manifest["num_classes"] == 12
        assert profile["splits"]["train"] == {k: manifest["splits"]["train"][k]
                                              for k in ("images", "identities", "cameras")}
        assert profile["splits"]["query"]["identities"] == 8
    found = client.search_runs([run.info.experiment_id], filter_string=f"dataset.digest = '{digest}'")
    assert [r.info.run_id for r in found] == [run.info.run_id]
    linked = {m.key: m for m in client.get_logged_model(model_id).metrics}
    assert sorted(linked) == ["eval/mAP", "eval/mINP", "eval/rank1"]
    for key, metric in linked.items():
        assert metric.value == pytest.approx(summary[key.split("/")[1]])
        assert (metric.dataset_name, metric.dataset_digest) == (f"{shards.name}/query+gallery", digest)
        # the run's own point, linked: no second point in the run's history
        assert len(client.get_metric_history(run.info.run_id, key)) == 1


@pytest.mark.timeout(240)
def test_training_records_one_run(tiny_shards, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "run"
    train(tiny_shards, out, f"tracking.uri={uri}", "tracking.log_model=true", "tracking.run_name=tiny",
          "tracking.timeout_s=60")
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "tiny"
    check_run(client, uri, run, out, tiny_shards)
    assert json.loads((out / "summary.json").read_text())["mlflow_run_id"] == run.info.run_id
    assert not (out / "tracking/fallback.db").exists()


@pytest.mark.timeout(240)
def test_training_with_a_dead_server_finishes_and_falls_back(tiny_shards, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "run"
    proc = train(tiny_shards, out, f"tracking.uri={dead}", "tracking.log_model=true", "tracking.timeout_s=2")
    assert proc.stderr.count("is not answering") == 1
    assert "fallback.db" in proc.stderr
    fallback = f"sqlite:///{(out / 'tracking/fallback.db').resolve()}"
    client = MlflowClient(tracking_uri=fallback)
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert len(runs) == 1
    assert runs[0].data.tags["primary_tracking_uri"] == dead
    assert re.fullmatch(r"test-ddp-w2-\d{8}-\d{6}-[0-9a-f]{4}", runs[0].info.run_name), runs[0].info.run_name
    check_run(client, fallback, runs[0], out, tiny_shards)
