"""launch/compare.py on a real embedded MLflow store: the table shows only the params that differ,
sorted by the metric, with the training data's digest, final metrics and throughput; the PNGs and CSV are written; bad
experiment / filter / metric names give errors that say what exists."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipeline.tracking.compare import compare_runs, resolve_metric
from pipeline.config import Config, TrackingConfig
from pipeline.tracking import Tracker

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "compare"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two finished runs that differ only in model.backbone (resnet18 scores higher); resnet50 trained
    on one shard set (digest aaaa...), resnet18 on two (bbbb..., cccc...)."""
    root = tmp_path_factory.mktemp("compare-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)                   # the embedded store keeps artifacts in ./mlruns
        for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
            mp.delenv(name, raising=False)       # the Tracker sets them; restored on exit
        for backbone, mAP, speed in (("resnet50", 0.61, 120.0), ("resnet18", 0.72, 400.0)):
            cfg = Config()
            cfg.model.backbone = backbone
            tracker = Tracker(TrackingConfig(uri=uri, experiment=EXPERIMENT, run_name=f"run-{backbone}",
                                             timeout_s=60), is_main=True, output_dir=root / backbone)
            tracker.start(cfg.flat(), {"world_size": "2"})
            sets = ["a"] if backbone == "resnet50" else ["b", "c"]
            tracker.log_datasets([{"name": f"set-{x}/train", "location": f"/data/{x}", "manifest_sha256": x * 64,
                                   "profile": {"splits": {}}, "context": "training"} for x in sets]
                                 + [{"name": f"set-{sets[0]}/query+gallery", "location": f"/data/{sets[0]}",
                                     "manifest_sha256": sets[0] * 64, "profile": {}, "context": "evaluation"}])
            for step in range(1, 6):
                tracker.log_metrics({"loss/total": 2.0 / step, "loss/id": 1.0 / step,
                                     "throughput/images_per_s": speed + step}, step=step)
            tracker.log_metrics({"eval/rank1": mAP + 0.2, "eval/rank5": mAP + 0.25, "eval/mAP": mAP,
                                 "eval/mINP": mAP - 0.3}, step=5)
            tracker.finish("FINISHED")
    return uri


@pytest.mark.timeout(120)
def test_cli_table_and_plots(store, tmp_path):
    out = tmp_path / "cmp"
    env = dict(os.environ, MLFLOW_TRACKING_URI=store)          # the standard switch picks the store
    proc = subprocess.run([sys.executable, str(ROOT / "launch/compare.py"), "--experiment", EXPERIMENT,
                           "--metric", "mAP", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = lines[1].split()
    assert header == ["run", "run_id", "status", "data", "model.backbone", "rank1", "rank5", "mAP", "mINP",
                      "images/s"]
    first, second = lines[3].split(), lines[4].split()
    assert first[0] == "run-resnet18" and second[0] == "run-resnet50"        # best mAP first
    assert first[3] == "b" * 12 + "+" + "c" * 12 and second[3] == "a" * 12   # the training inputs only
    assert first[4] == "resnet18" and first[7] == "0.7200" and first[9] == "403.0"   # mean of 401..405
    assert second[6] == "0.8600"

    with open(out / "runs.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == header and [r[0] for r in rows[1:]] == ["run-resnet18", "run-resnet50"]
    for name in ("eval_mAP.png", "loss.png"):
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.width > 300 and img.height > 200
    assert not [p for p in out.iterdir() if p.name.startswith(".")]          # no temp files left


@pytest.mark.timeout(60)
def test_filter_and_errors(store, tmp_path):
    one = compare_runs(EXPERIMENT, filter_string="params.model.backbone = 'resnet50'", tracking_uri=store)
    assert [r.info.run_name for r in one.runs] == ["run-resnet50"] and one.differing_params == []
    loss = compare_runs(EXPERIMENT, metric="loss/total", tracking_uri=store)
    assert loss.metric_key == "loss/total" and loss.columns[5] == "loss/total"
    # Runs on given data, by the digest the table shows (README: searching runs by dataset digest).
    on_c = compare_runs(EXPERIMENT, filter_string=f"dataset.digest LIKE '{'c' * 12}%'", tracking_uri=store)
    assert [r.info.run_name for r in on_c.runs] == ["run-resnet18"]
    on_a = compare_runs(EXPERIMENT, filter_string=f"dataset.digest = '{'a' * 32}' AND dataset.context = 'training'",
                        tracking_uri=store)
    assert [r.info.run_name for r in on_a.runs] == ["run-resnet50"]

    with pytest.raises(ValueError, match=r"experiment 'nope' not found.*'compare'"):
        compare_runs("nope", tracking_uri=store)
    with pytest.raises(ValueError, match="not a valid MLflow search filter"):
        compare_runs(EXPERIMENT, filter_string="params.model.backbone = resnet50", tracking_uri=store)
    with pytest.raises(ValueError, match="no runs .* match"):
        compare_runs(EXPERIMENT, filter_string="params.model.backbone = 'resnet101'", tracking_uri=store)
    with pytest.raises(ValueError, match=r"'top1'.*eval/mAP"):
        compare_runs(EXPERIMENT, metric="top1", tracking_uri=store)

    proc = subprocess.run([sys.executable, str(ROOT / "launch/compare.py"), "--experiment", "nope",
                           "--tracking-uri", store], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "experiment 'nope' not found" in proc.stderr


def test_resolve_metric():
    keys = {"eval/mAP", "final/mAP", "other/mAP", "loss/total", "mAPx"}
    assert resolve_metric("mAP", keys) == "final/mAP"
    assert resolve_metric("mAP", keys | {"mAP"}) == "mAP"
    assert resolve_metric("mAP", {"other/mAP", "eval/mAP"}) == "eval/mAP"
    assert resolve_metric("total", keys) == "loss/total"
    assert resolve_metric("rank1", keys) is None
