"""Every shipped recipe runs as shipped: the paths users take, end to end.

Each recipe is trained by 2 real torchrun processes on gloo, on one tiny synthetic shard set, with only
these keys overridden: where the data, the outputs and the tracking store are (`data.shards`,
`output_dir`, `tracking.uri`), how long it trains (`train.epochs`, `train.steps_per_epoch`) and
`model.pretrained`, pointed at a local copy of a torchvision-named ResNet-50 state dict. Backbone, image
size, P×K, AMP, channels_last, DataLoader workers, the engine, tracking, model logging and the final
evaluation stay as shipped. Every run must

- exit 0 and leave a FINISHED MLflow run with metrics, evaluation plots and a servable model
  (`mlflow.pyfunc.load_model("runs:/<id>/model").predict(uint8 images)` -> N×D embeddings);
- record the precision it really computed in (summary.json);
- leave a checkpoint that `launch/evaluate.py` evaluates to the same numbers as the run's own final
  evaluation (DeepSpeed: the checkpoint holds the fp32 master weights, equal to DeepSpeed's own
  reconstruction of its ZeRO checkpoint).

The four dataset recipes differ only in where their data and outputs go and how often they evaluate
(a test checks exactly that), so the Market-1501 run stands for all four.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
DATASET_RECIPES = ("market1501", "dukemtmc", "msmt17", "cuhk03np")
# What the dataset recipes may differ in: data and output locations, run names, schedule and cadence.
LOCATION_AND_SCHEDULE = {"data.shards", "output_dir", "tracking.experiment", "tracking.run_name",
                         "eval.every_epochs", "train.epochs", "train.decay_start_epoch",
                         "checkpoint.every_steps"}


def test_dataset_recipes_differ_only_in_data_location_and_schedule():
    base = load_config(ROOT / "configs/market1501.yaml").flat()
    for name in DATASET_RECIPES[1:]:
        other = load_config(ROOT / f"configs/{name}.yaml").flat()
        assert set(other) == set(base)
        differ = {key for key in base if base[key] != other[key]}
        extra = differ - LOCATION_AND_SCHEDULE
        assert not extra, f"{name}.yaml differs from market1501.yaml in {extra}"


@pytest.fixture(scope="module")
def recipe_shards(tmp_path_factory) -> Path:
    """20 train identities (P = 16 needs at least 16) and 4 test identities at 64x32; the recipes
    decode them at their own image size."""
    from pipeline.data.datasets import parse_market1501
    from pipeline.data.shards import write_shards
    from pipeline.data.synthetic import make_synthetic

    raw = tmp_path_factory.mktemp("recipe_raw")
    make_synthetic(raw, train_ids=20, test_ids=4, seed=3, image_size=(64, 32), images_per_id=8, progress=False)
    out = tmp_path_factory.mktemp("recipe_shards")
    write_shards(parse_market1501(raw), out, images_per_shard=60, progress=False)
    return out


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory) -> Path:
    """A local stand-in for torchvision's resnet50 ImageNet file: the same key names and shapes (with
    the 1000-class fc the loader drops), named with its own sha256 prefix as torchvision names files."""
    from pipeline.model.backbone import ResNet

    torch.manual_seed(0)
    state = ResNet("resnet50").state_dict()
    state["fc.weight"] = torch.randn(1000, 2048) * 0.01
    state["fc.bias"] = torch.zeros(1000)
    folder = tmp_path_factory.mktemp("weights")
    tmp = folder / "resnet50.pth"
    torch.save(state, tmp)
    path = folder / f"resnet50-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth"
    tmp.rename(path)
    return path


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def train_recipe(recipe: str, shards: Path, out: Path, uri: str, pretrained: Path | None) -> dict:
    cfg = load_config(ROOT / f"configs/{recipe}.yaml")
    overrides = [f"data.shards={shards}", f"output_dir={out}", f"tracking.uri={uri}",
                 "train.epochs=1", "train.steps_per_epoch=2"]
    if cfg.model.pretrained:
        overrides.append(f"model.pretrained={pretrained}")
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--monitor-interval", "0.5", str(ROOT / "launch/train.py"), "--config",
           str(ROOT / f"configs/{recipe}.yaml"), *overrides]
    proc = subprocess.run(cmd, cwd=out.parent, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{recipe}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-8000:]}"
    return json.loads((out / "summary.json").read_text())


def all_artifacts(client, run_id: str, path: str = "") -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= all_artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("recipe", ["market1501", "deepspeed_zero2", "demo"])
def test_shipped_recipe_runs_as_shipped(recipe, recipe_shards, resnet50_file, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    cfg = load_config(ROOT / f"configs/{recipe}.yaml")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "run"
    summary = train_recipe(recipe, recipe_shards, out, uri, resnet50_file)

    # The run trained as shipped and says in what precision it really computed.
    assert summary["engine"] == cfg.engine.backend and summary["world_size"] == 2
    assert summary["global_step"] == 2
    precision = summary["precision"]
    assert precision["amp"] == cfg.train.amp
    assert precision["observed_forward_dtype"] == {"bf16": "bfloat16", "none": "float32"}[cfg.train.amp]

    # A FINISHED MLflow run with its metrics, pictures and a servable model.
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.info.run_id == summary["mlflow_run_id"]
    for key in ("loss/total", "loss/global_triplet", "loss/local_triplet", "loss/id", "lr",
                "eval/rank1", "eval/mAP", "eval/mINP"):
        assert key in run.data.metrics, key
    assert run.data.params["model.backbone"] == cfg.model.backbone
    artifacts = all_artifacts(client, run.info.run_id)
    assert {"config.yaml", "eval/epoch-0001/cmc.png", "eval/epoch-0001/ranked_lists.png",
            "eval/epoch-0001/alignment.png"} <= artifacts
    mlflow.set_tracking_uri(uri)
    try:
        served = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
        h, w = cfg.data.image_size
        images = np.random.default_rng(0).integers(0, 256, (3, h, w, 3), dtype=np.uint8)
        embeddings = np.asarray(served.predict(images))
    finally:
        mlflow.set_tracking_uri(None)
    assert embeddings.shape[0] == 3 and embeddings.dtype == np.float32 and np.isfinite(embeddings).all()
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-4)

    # The checkpoint evaluates offline to the run's own final numbers.
    checkpoint = Path(summary["checkpoint"])
    proc = subprocess.run([PY, str(ROOT / "launch/evaluate.py"), "--config", str(ROOT / f"configs/{recipe}.yaml"),
                           "--checkpoint", str(checkpoint), f"data.shards={recipe_shards}"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    offline = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("rank1", "mAP", "mINP"):
        assert offline[key] == pytest.approx(summary["final_metrics"][key], abs=1e-6), key
    assert Path(offline["artifacts"][-1]).parent == (out / "eval" / checkpoint.name.removesuffix(".pt")).resolve()

    if cfg.engine.backend == "deepspeed":
        # Evaluation and export use the fp32 master weights, exactly DeepSpeed's own fp32 state.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from pipeline.checkpoint import load_checkpoint_file

        saved = load_checkpoint_file(checkpoint)["model"]
        engine_fp32 = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent / "ds"),
                                                               tag=checkpoint.name.removesuffix(".pt"))
        assert engine_fp32 and set(engine_fp32) <= set(saved)
        for name, value in engine_fp32.items():
            if value.is_floating_point():
                assert saved[name].dtype == torch.float32, name
            assert torch.equal(saved[name], value.to(saved[name].dtype)), name
        moved = [n for n, v in engine_fp32.items()
                 if v.is_floating_point() and not torch.equal(v.float(), v.bfloat16().float())]
        assert moved, "every weight is a bf16 value: these look like rounded copies, not master weights"


def test_deepspeed_recipe_is_the_market_recipe_on_deepspeed():
    market = load_config(ROOT / "configs/market1501.yaml").flat()
    zero2 = load_config(ROOT / "configs/deepspeed_zero2.yaml").flat()
    differ = {key for key in market if market[key] != zero2.get(key)}
    assert differ == {"output_dir", "engine.backend", "engine.deepspeed.zero_optimization.stage"}
