"""The training engine end to end: real torchrun processes on gloo, tiny synthetic shards.

- 2-process DDP training: loss decreases, evaluation runs, summary/world size are right;
- preemption (SIGTERM to the torchrun agent): checkpoint, exit 75, resume with the same command, and
  the loss sequence equals an uninterrupted run's step for step;
- a worker SIGKILLed mid-epoch under `--max-restarts 1`: the job restarts from the checkpoint and ends
  with the uninterrupted run's losses;
- DeepSpeed (ZeRO-2) saving and resuming, at the same and at other world sizes: test_resume_world_size.py;
- non-finite loss: stops naming the step, or skips steps when configured;
- bad configuration: exit 2 with the key named.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _env():
    # Fresh worker stores per restart round (torch's shared rendezvous store can hand a restarted
    # round the previous round's gloo addresses: "Connection refused"); see docs/multinode.md.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _overrides(shards, out, *extra):
    return [f"data.shards={shards}", f"output_dir={out}", "tracking.enabled=false", *extra]


def torchrun_cmd(nproc, overrides, max_restarts=0, port=None):
    rdzv = ["--standalone"] if port is None else ["--rdzv-backend", "c10d", "--rdzv-endpoint",
                                                  f"127.0.0.1:{port}", "--nnodes", "1"]
    return [PY, "-m", "torch.distributed.run", *rdzv, "--nproc-per-node", str(nproc),
            "--max-restarts", str(max_restarts), "--monitor-interval", "0.5",
            str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/test.yaml"), *overrides]


def run_ok(cmd, timeout=240):
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def losses(out: Path) -> dict[int, float]:
    """global_step -> total loss; for a step logged twice (re-done after a crash) the last one wins."""
    seq = {}
    for line in (out / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        seq[rec["global_step"]] = rec["loss/total"]
    return seq


def wait_for_steps(out: Path, n: int, proc: subprocess.Popen, timeout=180):
    log = out / "train_log.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training ended early with {proc.returncode}: {proc.stderr.read()[-4000:]}")
        if log.is_file() and len(log.read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no {n} steps logged within {timeout}s")


@pytest.fixture(scope="module")
def reference_run(tiny_shards, tmp_path_factory):
    """An uninterrupted 2-process run: 3 epochs, checkpoint every 2 steps, final evaluation."""
    out = tmp_path_factory.mktemp("reference")
    run_ok(torchrun_cmd(2, _overrides(tiny_shards, out, "train.epochs=3")))
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_two_processes_learn(reference_run):
    summary = json.loads((reference_run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_completed"] == 3
    assert summary["global_step"] == 3 * summary["steps_per_epoch"]
    seq = list(losses(reference_run).values())
    assert len(seq) == summary["global_step"]
    k = max(2, len(seq) // 4)
    assert sum(seq[-k:]) / k < sum(seq[:k]) / k, f"loss did not decrease: {seq}"
    for key in ("rank1", "mAP", "mINP"):
        assert 0.0 <= summary["final_metrics"][key] <= 1.0
    # The aligned branch's health is logged every step and summarised for the last epoch.
    records = [json.loads(line) for line in (reference_run / "train_log.jsonl").read_text().splitlines()]
    for key in ("local/pos_match", "local/neg_match", "local/saturated", "local/neg_cosine", "local/precision"):
        assert all(0.0 <= rec[key] <= 1.0 for rec in records), key
    branch = summary["local_branch"]
    assert branch["saturated"] < 0.5 and branch["pos_match"] < 0.95, branch   # unit-distance stripes
    assert "warning" in branch and (branch["warning"] is None or "collapsed" in branch["warning"])
    ckpts = sorted(p.name for p in (reference_run / "checkpoints").glob("ckpt-*.pt"))
    assert len(ckpts) == 2  # keep_last: 2
    assert (reference_run / "checkpoints" / "latest").read_text() == ckpts[-1]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_preemption_signal_checkpoints_and_resume_matches(reference_run, tiny_shards, tmp_path):
    out = tmp_path / "preempted"
    cmd = torchrun_cmd(2, _overrides(tiny_shards, out, "train.epochs=3", "checkpoint.every_steps=1000"))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for_steps(out, 3, proc)
    proc.send_signal(signal.SIGTERM)  # the torchrun agent forwards it to both workers
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    marker = json.loads((out / "preempted.json").read_text())
    assert marker["exit_code"] == 75 and marker["global_step"] >= 3
    assert "preemption signal received" in err
    assert (out / "checkpoints" / "latest").read_text() == marker["checkpoint"]

    run_ok(cmd)  # the same command again: resume from latest
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == [marker["checkpoint"]]
    assert not (out / "preempted.json").exists()
    ref, got = losses(reference_run), losses(out)
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), f"step {step}"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_killed_worker_restarts_from_checkpoint(reference_run, tiny_shards, tmp_path):
    out = tmp_path / "killed"
    cmd = torchrun_cmd(2, _overrides(tiny_shards, out, "train.epochs=3"), max_restarts=1)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for_steps(out, 5, proc)  # past the step-2 and step-4 checkpoints
    workers = subprocess.run(["pgrep", "-f", f"launch/train.py.*output_dir={out}"], capture_output=True,
                             text=True).stdout.split()
    workers = [int(p) for p in workers if int(p) != proc.pid]
    assert workers, "no worker processes found"
    os.kill(max(workers), signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"], "the restarted workers did not resume from a checkpoint"
    ref, got = losses(reference_run), losses(out)
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), f"step {step}"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_max_restarts_without_fresh_stores_is_refused_before_any_work(tiny_shards, tmp_path):
    """torch's shared rendezvous store breaks the first restart (pytorch#135712): without
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 the workers refuse at once, naming the variable, instead of
    training until a fault and then dying in gloo's connectFullMesh. (With it set, a killed worker
    restarts and resumes: test_killed_worker_restarts_from_checkpoint.)"""
    out = tmp_path / "refused"
    env = _env()
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE")
    started = time.monotonic()
    proc = subprocess.run(torchrun_cmd(2, _overrides(tiny_shards, out), max_restarts=1), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=100)
    assert proc.returncode != 0
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in proc.stderr and "pytorch#135712" in proc.stderr
    assert not (out / "train_log.jsonl").exists() and not (out / "checkpoints").exists()
    assert time.monotonic() - started < 90


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bf16_autocast_runs_on_cpu_and_learns(reference_run, tiny_shards, tmp_path):
    """train.amp=bf16 is not ignored on a CPU: the forward runs under CPU autocast, the losses stay
    finite and decrease, and summary.json says what precision was used."""
    out = tmp_path / "bf16"
    run_ok(torchrun_cmd(2, _overrides(tiny_shards, out, "train.epochs=3", "train.amp=bf16")))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"]["observed_forward_dtype"] == "bfloat16"
    assert summary["precision"]["mechanism"].startswith("torch.autocast(cpu")
    seq = list(losses(out).values())
    assert all(map(math.isfinite, seq)) and len(seq) == summary["global_step"]
    k = max(2, len(seq) // 4)
    assert sum(seq[-k:]) / k < sum(seq[:k]) / k, f"loss did not decrease: {seq}"
    fp32 = losses(reference_run)       # same data, seed and steps in float32
    assert seq[0] != fp32[1] and seq[0] == pytest.approx(fp32[1], rel=0.05)
    assert json.loads((reference_run / "summary.json").read_text())["precision"]["observed_forward_dtype"] == "float32"


@pytest.mark.timeout(60)
def test_fp16_without_cuda_is_a_config_error(tiny_shards, tmp_path):
    cmd = [PY, str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/test.yaml"),
           *_overrides(tiny_shards, tmp_path, "train.amp=fp16")]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "'train.amp' is fp16" in proc.stderr and "train.amp=bf16" in proc.stderr


@pytest.mark.timeout(200)
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_loss(tiny_shards, tmp_path, policy):
    out = tmp_path / policy
    cmd = [PY, str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/test.yaml"),
           *_overrides(tiny_shards, out, "train.lr=1e30", "train.epochs=1", f"train.nan_policy={policy}",
                       "eval.final=false")]  # the diverged model cannot be evaluated
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=180)
    if policy == "stop":
        assert proc.returncode != 0
        assert "NonFiniteLossError: non-finite loss at epoch 0, step" in proc.stderr
        assert "train.nan_policy=skip" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert json.loads((out / "summary.json").read_text())["skipped_steps"] > 0


@pytest.mark.timeout(60)
def test_bad_config_exits_2_naming_key(tiny_shards, tmp_path):
    cmd = [PY, str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/test.yaml"),
           *_overrides(tiny_shards, tmp_path, "data.k=1")]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "'data.k' is 1" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_deepspeed_in_one_plain_process(tiny_shards, tmp_path):
    """DeepSpeed needs a process group; a plain `python launch/train.py` (one GPU, no torchrun) gets a
    private one-rank group instead of DeepSpeed's 'Distributed backend is not initialized'."""
    out = tmp_path / "ds1"
    cmd = [PY, str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/test.yaml"),
           *_overrides(tiny_shards, out, "engine.backend=deepspeed", "train.amp=bf16", "train.epochs=1")]
    env = {k: v for k, v in _env().items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=380)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == "deepspeed" and summary["world_size"] == 1
    assert summary["precision"]["observed_forward_dtype"] == "bfloat16"
