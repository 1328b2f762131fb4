"""Tracker against real MLflow stores (embedded sqlite) and real gloo processes.

- two gloo ranks: only rank 0 writes, exactly one run with params, per-step and final metrics,
  artifacts and FINISHED;
- a resumed tracker keeps the run id and appends metrics;
- a tracker pointed at a closed port returns at once from every call, warns once, and the complete
  run is in the local fallback store afterwards;
- MLflow's limits: long and None param values, invalid names; the model and system metrics.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from pipeline.config import Config, TrackingConfig
from pipeline.tracking import Tracker, clean_key, clip_value, default_run_name, resolve_tracking_uri, unflatten
from gloo_ranks import free_port

ROOT = Path(__file__).resolve().parents[1]


def sqlite_uri(path: Path) -> str:
    return f"sqlite:///{path}"


def runs_of(uri: str, experiment: str):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client, ([] if exp is None else client.search_runs([exp.experiment_id]))


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """The embedded store puts artifacts in ./mlruns, as MLflow does: keep them out of the repo."""
    monkeypatch.chdir(tmp_path)
    # The Tracker sets MLflow's HTTP retry/timeout variables in its process: undo that after each test.
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)


def tracking_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "pipeline.tracking" and r.levelno == logging.WARNING and "not answering" in r.getMessage()]


# --------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------
def test_shard_set_names_and_dataset_sources():
    from pipeline.data import shard_set_name
    from pipeline.tracking.datasets import dataset_input, input_context

    assert shard_set_name("/data/shards/market1501") == "market1501"
    assert shard_set_name("http://host/duke/") == "duke"
    assert shard_set_name("pipe:curl -s https://host/msmt17/{name}") == "msmt17"
    assert shard_set_name("s3://bucket/") == "bucket" and shard_set_name("pipe:") == "shards"
    remote = dataset_input("duke/train", "https://host/duke/", "f" * 64, {"num_classes": 2}, "training")
    assert (remote.dataset.source_type, json.loads(remote.dataset.source)) == ("http", {"url": "https://host/duke/"})
    assert remote.dataset.digest == "f" * 32 and input_context(remote) == "training"
    local = dataset_input("m/query+gallery", "/data/m", "e" * 64, {}, "evaluation")
    assert (local.dataset.source_type, json.loads(local.dataset.source)) == ("reid-shards", {"uri": "/data/m"})
    with pytest.raises(ValueError, match="dataset context 'test'"):
        dataset_input("m", "/data/m", "e" * 64, {}, "test")


def test_uri_precedence(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5555")
    assert resolve_tracking_uri(None) == "http://127.0.0.1:5555"
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_keys_values_and_unflatten():
    assert clean_key("loss/total") == "loss/total"
    assert clean_key("a%b(c)") == "a_b_c_"
    assert clean_key("/abs//x") == "_abs__x"
    assert clean_key("..") == "_.."
    assert len(clean_key("k" * 400)) == 250
    assert clip_value(None, 10) == "None"
    long = clip_value("x" * 7000, 6000)
    assert len(long) == 6000 and "truncated from 7000 chars" in long
    assert unflatten({"a.b": 1, "a.c": [1, 2], "d": None}) == {"a": {"b": 1, "c": [1, 2]}, "d": None}
    with pytest.raises(ValueError, match="'a.b'"):
        unflatten({"a": 1, "a.b": 2})


# --------------------------------------------------------------------------------------------------
# Two real gloo ranks
# --------------------------------------------------------------------------------------------------
RANK_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from PIL import Image
    from pipeline.config import Config
    from pipeline.distributed import init_distributed, barrier, broadcast_object, cleanup
    from pipeline.tracking import Tracker

    out, uri = Path(sys.argv[1]), sys.argv[2]
    dist = init_distributed("gloo", timeout_s=60)
    cfg = Config()
    cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.run_name = uri, "gloo", "two-ranks"
    cfg.tracking.timeout_s = 60.0   # a loaded CI box can take a while to create a new sqlite store
    tracker = Tracker(cfg.tracking, is_main=dist.is_main, output_dir=out / f"rank{dist.rank}")
    run_id = broadcast_object(tracker.start(params=cfg.flat(), tags={"world_size": str(dist.world_size)}))
    for step in range(1, 21):
        tracker.log_metrics({"loss/total": 1.0 / step, "lr": 2e-4, "throughput/images_per_s": 100.0 + dist.rank},
                            step=step)
        barrier()
    png = out / f"cmc-rank{dist.rank}.png"
    Image.new("RGB", (8, 8), (dist.rank * 100, 0, 0)).save(png)
    tracker.log_artifact(png, artifact_path="plots")
    tracker.log_metrics({"eval/rank1": 0.9, "eval/rank5": 0.95, "eval/mAP": 0.8, "eval/mINP": 0.5}, step=20)
    tracker.finish("FINISHED")
    print(json.dumps({"rank": dist.rank, "run_id": run_id}))
    cleanup()
""")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_gloo_ranks_record_one_run(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    uri = sqlite_uri(tmp_path / "mlflow.db")
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=str(ROOT))
        env.pop("MLFLOW_TRACKING_URI", None)
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path), uri], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=100)
            assert proc.returncode == 0, stderr[-4000:]
            results.append(json.loads(stdout.strip().splitlines()[-1]) | {"stderr": stderr})
    finally:
        for proc in procs:
            proc.kill()

    run_id = results[0]["run_id"]
    assert run_id and results[1]["run_id"] == run_id, results[0]["stderr"][-3000:]  # broadcast from rank 0
    assert not (tmp_path / "rank1").exists()                # rank 1 wrote nothing
    client, runs = runs_of(uri, "gloo")
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "two-ranks"
    assert run.data.params["data.p"] == "16" and run.data.params["model.pretrained"] == "None"
    assert len(run.data.params) == len(Config().flat())
    assert run.data.tags["world_size"] == "2" and run.data.tags["torch.version"] == torch.__version__
    assert steps(client, run_id, "loss/total") == list(range(1, 21))
    assert {m.value for m in client.get_metric_history(run_id, "throughput/images_per_s")} == {100.0}  # rank 0's
    assert run.data.metrics["eval/mAP"] == pytest.approx(0.8) and run.data.metrics["eval/mINP"] == pytest.approx(0.5)
    artifacts = ({a.path for a in client.list_artifacts(run_id)}
                 | {a.path for a in client.list_artifacts(run_id, "plots")})
    assert {"config.yaml", "plots/cmc-rank0.png"} <= artifacts and "plots/cmc-rank1.png" not in artifacts
    local = tmp_path / "rank0" / "tracking"
    assert len((local / "metrics.jsonl").read_text().splitlines()) == 21
    assert json.loads((local / "run.json").read_text())["run_id"] == run_id
    assert not (local / "fallback.db").exists() and not (local / "staging").exists()


# --------------------------------------------------------------------------------------------------
# Single process, embedded store
# --------------------------------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_resume_continues_the_same_run(tmp_path, caplog):
    uri = sqlite_uri(tmp_path / "mlflow.db")
    cfg = Config()
    tcfg = TrackingConfig(uri=uri, experiment="resume", run_name="r", timeout_s=30)
    first = Tracker(tcfg, is_main=True, output_dir=tmp_path / "out")
    run_id = first.start(cfg.flat(), {"world_size": "2"})
    assert run_id is not None and first.run_id == run_id
    for step in range(5):
        first.log_metrics({"loss/total": 1.0, "epoch/images_per_s": 10.0}, step=step)
    first.finish("KILLED")
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).info.status == "KILLED"

    cfg.train.epochs = 200                                    # a resumed job may change a param
    second = Tracker(tcfg, is_main=True, output_dir=tmp_path / "out")
    assert second.start(cfg.flat(), {"world_size": "4"}, run_id=run_id) == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    for step in range(5, 10):
        second.log_metrics({"loss/total": 0.5}, step=step)
    second.finish("FINISHED")

    _, runs = runs_of(uri, "resume")
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert steps(client, run_id, "loss/total") == list(range(10))
    assert run.data.params["train.epochs"] == "120"            # MLflow keeps the first value ...
    assert "train.epochs" in run.data.tags["params_changed_on_resume"]   # ... and says it changed
    assert run.data.tags["world_size"] == "4"
    assert any("train.epochs" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert len((tmp_path / "out/tracking/metrics.jsonl").read_text().splitlines()) == 10

    # A run id the store does not know (another store, deleted run): a new run that says so.
    third = Tracker(tcfg, is_main=True, output_dir=tmp_path / "other")
    new_id = third.start(cfg.flat(), {}, run_id="0" * 32)
    third.finish("FINISHED")
    assert new_id != "0" * 32 and client.get_run(new_id).data.tags["resumed_from_run_id"] == "0" * 32


@pytest.mark.timeout(90)
def test_params_limits_artifacts_and_misuse(tmp_path):
    uri = sqlite_uri(tmp_path / "mlflow.db")
    tracker = Tracker(TrackingConfig(uri=uri, experiment="limits", timeout_s=30), is_main=True,
                      output_dir=tmp_path / "out")
    with pytest.raises(RuntimeError, match="before start"):
        tracker.log_metrics({"a": 1.0}, step=0)
    params = {"model.pretrained": None, "notes.long": "y" * 7000, "data.image_size": [256, 128],
              "bad key(1)": 3}
    run_id = tracker.start(params, {"note": "z" * 9000})
    with pytest.raises(RuntimeError, match="already called"):
        tracker.start(params, {})
    with pytest.raises(TypeError, match="'loss/total'"):
        tracker.log_metrics({"loss/total": "high"}, step=0)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        tracker.log_artifact(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="FINISHED"):
        tracker.finish("DONE")
    tracker.log_metrics({"loss/total": torch.tensor(0.25), "acc@1": 0.5}, step=3)
    plot = tmp_path / "plot.png"
    plot.write_bytes(b"first")
    tracker.log_artifact(plot, artifact_path="plots")
    plot.write_bytes(b"second")                         # overwritten after logging: the logged one stays
    folder = tmp_path / "ranked"
    folder.mkdir()
    (folder / "q0.png").write_bytes(b"q0")
    tracker.log_artifact(folder, artifact_path="eval")
    tracker.finish("FAILED")
    with pytest.raises(RuntimeError, match="after finish"):
        tracker.log_metrics({"a": 1.0}, step=1)

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.params["model.pretrained"] == "None"
    assert run.data.params["data.image_size"] == "[256, 128]"
    assert run.data.params["bad key_1_"] == "3"
    assert len(run.data.params["notes.long"]) == 6000 and "truncated" in run.data.params["notes.long"]
    assert len(run.data.tags["note"]) == 8000
    assert run.data.metrics == {"loss/total": 0.25, "acc_1": 0.5}
    local = Path(client.download_artifacts(run_id, "", str(tmp_path / "dl")))
    assert (local / "plots/plot.png").read_bytes() == b"first"
    assert (local / "eval/ranked/q0.png").read_bytes() == b"q0"
    config = yaml.safe_load((local / "config.yaml").read_text())
    assert config["notes"]["long"] == "y" * 7000 and config["model"]["pretrained"] is None
    assert config["data"]["image_size"] == [256, 128]


@pytest.mark.timeout(90)
def test_model_and_system_metrics(tmp_path, monkeypatch):
    from pipeline.data.transforms import normalize
    from pipeline.inference import FeatureExtractor
    from pipeline.model import build_model
    from pipeline.serving import eval_state_dict

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    uri = sqlite_uri(tmp_path / "mlflow.db")
    tracker = Tracker(TrackingConfig(uri=uri, experiment="model", system_metrics=True, timeout_s=30),
                      is_main=True, output_dir=tmp_path / "out")
    run_id = tracker.start({"a": 1}, {})
    tracker.log_metrics({"loss/total": 1.0}, step=7)
    cfg = Config()
    cfg.model.backbone, cfg.model.last_stride, cfg.data.image_size = "resnet18", 2, [64, 32]
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=5).eval()
    root_level = logging.getLogger().level
    tracker.log_model(eval_state_dict(model), cfg.to_dict(), 5)
    assert logging.getLogger().level == root_level    # importing MLflow's model code must not mute warnings
    time.sleep(1.0)
    tracker.finish("FINISHED")
    client = MlflowClient(tracking_uri=uri)
    metrics = client.get_run(run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
    assert steps(client, run_id, "system/cpu_utilization_percentage")[-1] == 7   # at the training step
    (logged,) = client.search_logged_models([client.get_run(run_id).info.experiment_id])
    assert (logged.name, logged.source_run_id) == ("model", run_id)     # the run's MLflow 3 logged model
    x = torch.rand(3, 3, 64, 32)                                         # at the trained size
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model(normalize(x)), dim=1)
    torch.testing.assert_close(FeatureExtractor(f"runs:/{run_id}/model", tracking_uri=uri)(x), expected)


@pytest.mark.timeout(90)
def test_unnamed_runs_get_distinct_names_with_random_seeded_alike(tmp_path):
    """The trainer seeds `random`, from which MLflow draws its generated run names: two runs opened
    after the same seed would be named alike. Ours say what they are and differ."""
    uri = sqlite_uri(tmp_path / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("names")
    mlflow_names = []
    for _ in range(2):
        random.seed(0)
        mlflow_names.append(client.create_run(experiment_id).info.run_name)
    assert mlflow_names[0] == mlflow_names[1]                 # why the tracker names runs itself
    names = []
    for i, given in enumerate((None, None, default_run_name("names", "ddp", "w2"))):
        random.seed(0)
        tracker = Tracker(TrackingConfig(uri=uri, experiment="names", timeout_s=30), is_main=True,
                          output_dir=tmp_path / f"out{i}")
        run_id = tracker.start({"a": 1}, {}, run_name=given)
        tracker.finish("FINISHED")
        names.append(client.get_run(run_id).info.run_name)
    assert len(set(names)) == 3, names
    assert all(re.fullmatch(r"names-\d{8}-\d{6}-[0-9a-f]{4}", n) for n in names[:2]), names
    assert re.fullmatch(r"names-ddp-w2-\d{8}-\d{6}-[0-9a-f]{4}", names[2]), names[2]
    named = Tracker(TrackingConfig(uri=uri, experiment="names", run_name="mine", timeout_s=30), is_main=True,
                    output_dir=tmp_path / "named")
    run_id = named.start({"a": 1}, {}, run_name=default_run_name("ignored"))   # tracking.run_name wins
    named.finish("FINISHED")
    assert client.get_run(run_id).info.run_name == "mine"


def test_off_main_rank_and_disabled_do_nothing(tmp_path):
    uri = sqlite_uri(tmp_path / "mlflow.db")
    for tracker in (Tracker(TrackingConfig(uri=uri), is_main=False, output_dir=tmp_path / "a"),
                    Tracker(TrackingConfig(uri=uri, enabled=False), is_main=True, output_dir=tmp_path / "b")):
        assert tracker.start({"a": 1}, {}) is None
        tracker.log_metrics({"x": 1.0}, step=0)
        tracker.log_artifact(tmp_path / "does-not-matter")
        tracker.log_model({}, {}, 1)
        tracker.finish("FINISHED")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# A dead tracking server
# --------------------------------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_closed_port_never_blocks_and_falls_back(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.tracking")
    timeout = 2.0
    uri = f"http://127.0.0.1:{free_port()}"                   # nobody listens there
    cfg = Config()
    tracker = Tracker(TrackingConfig(uri=uri, experiment="dead", run_name="offline", timeout_s=timeout),
                      is_main=True, output_dir=tmp_path / "out")
    t0 = time.monotonic()
    assert tracker.start(cfg.flat(), {"world_size": "1"}) is None
    assert time.monotonic() - t0 < timeout
    slowest = 0.0
    for step in range(40):
        t0 = time.monotonic()
        tracker.log_metrics({"loss/total": 1.0 / (step + 1), "lr": 1e-3}, step=step)
        slowest = max(slowest, time.monotonic() - t0)
        time.sleep(0.02)
    plot = tmp_path / "cmc.png"
    plot.write_bytes(b"png")
    t0 = time.monotonic()
    tracker.log_artifact(plot, artifact_path="plots")
    slowest = max(slowest, time.monotonic() - t0)
    assert slowest < 0.5
    t0 = time.monotonic()
    tracker.finish("FINISHED")
    # the wait is bounded by timeout_s; writing the local fallback store (a new sqlite) comes on top
    assert time.monotonic() - t0 < timeout + 15
    assert len(tracking_warnings(caplog)) == 1

    assert tracker.fallback_uri == sqlite_uri((tmp_path / "out/tracking/fallback.db").resolve())
    client, runs = runs_of(tracker.fallback_uri, "dead")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "offline"
    assert run.data.tags["primary_tracking_uri"] == uri
    assert len(run.data.params) == len(cfg.flat())
    assert steps(client, run.info.run_id, "loss/total") == list(range(40))
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {"plots/cmc.png"}
    assert any(tracker.fallback_uri in r.getMessage() for r in caplog.records)

    # Resumed while the server is still down: start() hands back the run id to keep in checkpoints,
    # and the fallback run of this training is continued, not duplicated.
    again = Tracker(TrackingConfig(uri=uri, experiment="dead", timeout_s=timeout), is_main=True,
                    output_dir=tmp_path / "out")
    assert again.start(cfg.flat(), {}, run_id="abc123") == "abc123"
    again.log_metrics({"loss/total": 0.01}, step=40)
    again.log_artifact(plot, artifact_path="plots-resumed")
    again.finish("FINISHED")
    _, runs = runs_of(tracker.fallback_uri, "dead")
    assert [r.info.run_id for r in runs] == [run.info.run_id]
    assert steps(client, run.info.run_id, "loss/total") == list(range(41))
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots-resumed")] == ["plots-resumed/cmc.png"]
