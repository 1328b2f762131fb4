"""launch/evaluate.py end to end: a real checkpoint and real shards, one process and two torchrun ranks;
the JSON on the last line must be the metrics the library computes."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import Config
from pipeline.checkpoint import CheckpointManager
from pipeline.model import build_model

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = (64, 32)
KEYS = ("rank1", "rank5", "rank10", "mAP", "mINP", "cmc", "valid_queries")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory with one ResNet-18 checkpoint in the engine's format."""
    cfg = Config()
    cfg.model.backbone, cfg.model.last_stride, cfg.data.image_size = "resnet18", 1, list(IMAGE_SIZE)
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=12)
    run = tmp_path_factory.mktemp("run")
    CheckpointManager(run / "checkpoints").save(
        {"model": model.state_dict(), "config": cfg.to_dict(), "num_classes": 12, "mutual": False,
         "epoch": 1, "global_step": 10}, "ckpt-E0001-S000010.pt")
    return run


def evaluate_in_process(args: list[str]) -> tuple[int, str, str]:
    """launch/evaluate.py's main() in this process (saves an interpreter start per call)."""
    spec = importlib.util.spec_from_file_location("launch_evaluate", ROOT / "launch" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = module.main(["--config", str(ROOT / "configs" / "test.yaml"), *args])
    return code, out.getvalue(), err.getvalue()


def evaluate_torchrun(args: list[str], nproc: int, timeout: int = 200) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", str(nproc), "launch/evaluate.py", "--config",
                           "configs/test.yaml", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def single_run(run_dir, tiny_shards, tmp_path_factory) -> tuple[dict, str, Path]:
    out = tmp_path_factory.mktemp("eval")
    code, stdout, stderr = evaluate_in_process([
        "--checkpoint", str(run_dir), "--output-dir", str(out), "--distance", "global+local",
        f"data.shards={tiny_shards}", "eval.plots=true"])
    assert code == 0, stderr[-3000:]
    return last_json(stdout), stdout, out


def test_prints_table_then_json_and_writes_pictures(single_run, run_dir, tiny_shards):
    from pipeline.evaluation import evaluate
    from pipeline.model import model_from_checkpoint

    result, stdout, out = single_run
    assert set(KEYS) <= set(result) and result["distance"] == "global+local"
    assert "rank-1" in stdout and "mINP" in stdout and "epoch 1" in stdout
    for key in ("rank1", "rank5", "rank10", "mAP", "mINP"):
        assert 0.0 <= result[key] <= 1.0
    assert sorted(Path(p).name for p in result["artifacts"]) == ["alignment.png", "cmc.png", "metrics.json",
                                                                 "ranked_lists.png"]
    assert all(Path(p).parent == out and Path(p).stat().st_size > 1000 for p in result["artifacts"])
    assert json.loads((out / "metrics.json").read_text())["mAP"] == pytest.approx(result["mAP"])
    # alignment.png: 4 query rows, query between true match and negative, 64x32 images as 256x128 tiles
    # (the layout of pipeline.evaluation.visualize.plot_alignments; its content: test_eval_alignment_picture).
    from PIL import Image

    with Image.open(out / "alignment.png") as im:
        assert im.size == (2 * 24 + 3 * (128 + 2 * 3) + 2 * 110, 4 * (256 + 2 * 3 + 30) + 64 + 36)
    # The same numbers as the library computes in-process for that checkpoint.
    model, _ = model_from_checkpoint(run_dir / "checkpoints" / "ckpt-E0001-S000010.pt")
    expect = evaluate(model, tiny_shards, image_size=IMAGE_SIZE, distance="global+local",
                      batch_size=64, progress=False)
    for key in ("rank1", "rank5", "rank10", "mAP", "mINP", "valid_queries"):
        assert result[key] == pytest.approx(expect[key], abs=1e-6), key


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_torchrun_two_ranks_give_the_same_json(single_run, run_dir, tiny_shards, tmp_path):
    run = evaluate_torchrun(["--checkpoint", str(run_dir), "--output-dir", str(tmp_path),
                             "--distance", "global+local", f"data.shards={tiny_shards}",
                             "eval.plots=false"], nproc=2)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, "only rank 0 prints the result"
    result, expect = json.loads(lines[0]), single_run[0]
    for key in ("rank1", "rank5", "rank10", "mAP", "mINP", "valid_queries"):
        assert result[key] == pytest.approx(expect[key], abs=1e-6), key
    assert result["cmc"] == pytest.approx(expect["cmc"], abs=1e-6)


def test_bad_arguments_are_clear_errors(tiny_shards, tmp_path):
    code, _, err = evaluate_in_process(["--checkpoint", str(tmp_path / "nope"),
                                        f"data.shards={tiny_shards}"])
    assert code == 2 and "checkpoint error: no checkpoint at" in err
    code, _, err = evaluate_in_process(["--checkpoint", str(tmp_path), "eval.distanc=local"])
    assert code == 2 and "Did you mean 'eval.distance'" in err


def test_outputs_land_beside_the_checkpoint_not_in_the_current_folder(run_dir, tiny_shards, tmp_path,
                                                                      monkeypatch):
    """Without --output-dir, a checkpoint in <run>/checkpoints/ is evaluated into <run>/eval/<name>/,
    whatever folder the command runs from; the recipe's relative output_dir is not touched."""
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = evaluate_in_process(["--checkpoint", str(run_dir), f"data.shards={tiny_shards}",
                                                "eval.plots=false"])
    assert code == 0, stderr[-3000:]
    expected = run_dir.resolve() / "eval" / "ckpt-E0001-S000010"
    assert [Path(p) for p in last_json(stdout)["artifacts"]] == [expected / "metrics.json"]
    assert (expected / "metrics.json").is_file()
    assert list(tmp_path.iterdir()) == []      # nothing written where the command ran

    loose = tmp_path / "elsewhere"
    loose.mkdir()
    (loose / "model.pt").write_bytes((run_dir / "checkpoints" / "ckpt-E0001-S000010.pt").read_bytes())
    code, stdout, stderr = evaluate_in_process(["--checkpoint", str(loose / "model.pt"),
                                                f"data.shards={tiny_shards}", "eval.plots=false"])
    assert code == 0, stderr[-3000:]
    assert Path(last_json(stdout)["artifacts"][0]).parent == loose.resolve() / "eval-model"
