"""benchmarks/gpu_check.py --smoke: the GPU check's code paths at toy size on CPU.

It draws a tiny synthetic set, counts the model's FLOPs, trains the shipped Market recipe (DDP) and the
DeepSpeed ZeRO-2 recipe for a few steps on 2 gloo processes under torchrun, times the evaluation
pieces, and prints one JSON object as the last line of stdout. Here: that object is complete and its
figures are consistent with each other. Without --smoke and without CUDA it refuses with status 2.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0


def _check_run(run: dict, flops: dict, peak: float, world: int) -> None:
    assert run["world_size"] == world and run["global_step"] == 6
    assert run["amp"] == "bf16" and run["precision"]["observed_forward_dtype"] == "bfloat16"
    assert run["steps_timed"] == 4 and run["warmup_steps"] == 2
    for key in ("images_per_s_per_gpu", "images_per_s_per_gpu_median", "wall_images_per_s_per_gpu",
                "images_per_s_total"):
        assert _positive(run[key]), key
    assert run["images_per_s_total"] == pytest.approx(run["images_per_s_per_gpu"] * world, rel=1e-3)
    for key in ("data_wait_share", "comm_share", "loss_share"):
        assert 0.0 <= run[key] <= 1.0, key
    assert run["mfu"] == pytest.approx(flops["per_image_gflop"] * 1e9 * run["images_per_s_per_gpu"]
                                       / (peak * 1e12), rel=1e-3, abs=2e-6)
    assert run["mfu_wall"] == pytest.approx(flops["per_image_gflop"] * 1e9 * run["wall_images_per_s_per_gpu"]
                                            / (peak * 1e12), rel=1e-3, abs=2e-6)


@pytest.mark.slow
@pytest.mark.timeout(330)
def test_gpu_check_smoke():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["mode"] == "smoke"
    assert report["env"]["torch"] and "devices" in report["env"]
    assert "GPU check (smoke)" in proc.stderr and "model.pretrained=null" in proc.stderr

    flops, peak = report["flops"], report["peak"]
    assert peak["tflops"] == 1.0 and "placeholder" in peak["source"]
    assert _positive(flops["per_image_gflop"]) and flops["backbone"] == "resnet18"
    assert flops["forward_per_image_gflop"] < flops["per_image_gflop"] <= 3.5 * flops["forward_per_image_gflop"]
    assert (flops["global_dim"], flops["stripes"], flops["local_dim"]) == (512, 4, 128)  # 64x32, last stride 1

    ddp = report["ddp"]
    assert "error" not in ddp, ddp.get("error")
    assert ddp["engine"] == "ddp" and ddp["process_group"] == "gloo"
    _check_run(ddp, flops, peak["tflops"], world=2)

    ds = report["deepspeed"]
    if "error" in ds:
        assert isinstance(ds["error"], str) and ds["error"]
    else:
        assert ds["engine"] == "deepspeed"
        assert "torch_autocast" in ds["precision"]["mechanism"]
        _check_run(ds, flops, peak["tflops"], world=2)

    ev = report["eval"]
    assert "error" not in ev, ev.get("error")
    assert (ev["queries"], ev["gallery"]) == (50, 200) and ev["device"] == "cpu"
    expected = {"local_distance", "local_distance_big_blocks", "feature_distance_global",
                "feature_distance_global+local", "rank_metrics_global", "rank_metrics_global+local"}
    assert set(ev["parts"]) == expected
    for name, part in ev["parts"].items():
        assert _positive(part["seconds"]), name
    for name in ("rank_metrics_global", "rank_metrics_global+local"):
        assert 0.0 < ev["parts"][name]["mAP"] <= 1.0 and ev["parts"][name]["valid_queries"] > 0
    assert ev["parts"]["local_distance"]["shape"] == [50, 200]
    assert report["problems"] == [] or "error" in ds


@pytest.mark.timeout(120)
def test_gpu_check_without_cuda_needs_smoke():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=100)
    assert proc.returncode == 2
    assert "no CUDA device: run with --smoke to check the code paths on CPU" in proc.stderr
    assert proc.stdout == ""
