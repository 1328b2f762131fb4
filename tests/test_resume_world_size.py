"""Resuming on another number of ranks, below the trainer: DeepSpeed ZeRO-1/2's optimiser state
re-partitioned onto a new world size (pipeline/engine/backend.py), with real DeepSpeed engines on real
gloo process groups.

W ranks train a small AlignedReID two steps and write what the checkpoint file holds: the fp32 master
weights and the full optimiser state assembled from the ZeRO partitions. W' ranks (fewer, more, and a
count that does not divide the flat buffer evenly, so its padding moves) build a fresh engine, resume it
from that state, and assemble both again: they must be the saved tensors exactly. Then both worlds take
one more step on the same global batch: the weights after it must agree (up to the summation order of
the gradient all-reduce), which shows the state was not only stored but is what the optimiser uses.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gloo_ranks import run_ranks

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 12      # divisible by 1, 2, 3 and 4 ranks


def _backend(world: int, stage: int):
    from pipeline.config import load_config
    from pipeline.distributed import init_distributed
    from pipeline.engine.backend import build_backend
    from pipeline.model import build_model

    init_distributed("gloo", 120)
    cfg = load_config(ROOT / "configs/test.yaml", [
        "data.shards=unused", "engine.backend=deepspeed", f"engine.deepspeed.zero_optimization.stage={stage}",
        "train.lr=1e-2", "train.weight_decay=5e-4", f"data.p={GLOBAL_BATCH // world // 2}", "data.k=2"])
    torch.manual_seed(0)
    network = build_model(cfg.model, 6)
    return cfg, build_backend(cfg, network, torch.device("cpu"), world)


def _step(backend, rank: int, world: int, step: int) -> None:
    """One optimiser step on this rank's slice of a fixed global batch (ID loss only: no cross-rank
    loss terms, the gradient all-reduce is DeepSpeed's). BatchNorm uses its running statistics, as in
    test_distributed_equivalence: batch statistics of a rank's slice differ legitimately by world size."""
    g = torch.Generator().manual_seed(100 + step)
    images = torch.rand(GLOBAL_BATCH, 3, 64, 32, generator=g)
    labels = torch.randint(0, 6, (GLOBAL_BATCH,), generator=g)
    per = GLOBAL_BATCH // world
    backend.wrapped.train()
    for module in backend.network.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    out = backend.forward(images[rank * per:(rank + 1) * per])
    loss = torch.nn.functional.cross_entropy(out["logits"], labels[rank * per:(rank + 1) * per])
    backend.set_progress(step / 10)
    backend.step(loss)


def _save_worker(rank: int, world: int, out_dir: str, stage: int) -> None:
    cfg, backend = _backend(world, stage)
    for step in range(2):
        _step(backend, rank, world, step)
    weights = backend.fp32_state_dict()
    state = backend.state_dict()                      # collective
    _step(backend, rank, world, 2)
    after = backend.fp32_state_dict()
    if rank == 0:
        torch.save({"model": weights, **state, "world_size": world, "after": after}, Path(out_dir) / "ckpt.pt")
    torch.save({}, Path(out_dir) / f"rank{rank}.pt")


def _resume_worker(rank: int, world: int, out_dir: str, stage: int, saved_dir: str) -> None:
    cfg, backend = _backend(world, stage)
    state = torch.load(Path(saved_dir) / "ckpt.pt", weights_only=True)
    how = backend.load(state, Path(out_dir) / "no-deepspeed-dir", "ckpt-E0000-S000002")
    weights = backend.fp32_state_dict()
    full = backend.state_dict()
    _step(backend, rank, world, 2)
    torch.save({"how": how, "model": weights, "optimizer": full["optimizer"], "after": backend.fp32_state_dict()},
               Path(out_dir) / f"rank{rank}.pt")


def _save(directory: Path, world: int, stage: int) -> dict:
    directory.mkdir()
    run_ranks(_save_worker, world, directory, stage, timeout_s=300)
    return torch.load(directory / "ckpt.pt", weights_only=True)


@pytest.fixture(scope="module")
def saved_zero2(tmp_path_factory):
    """A ZeRO-2 state written by 2 ranks."""
    directory = tmp_path_factory.mktemp("zero2") / "saved"
    return directory, _save(directory, 2, 2)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage,before,after", [(2, 2, 1), (1, 1, 3)])
def test_zero_state_moves_to_another_world_size(tmp_path, saved_zero2, stage, before, after):
    """ZeRO-2 from 2 ranks to 1; ZeRO-1 from 1 rank to 3 (a flat buffer 3 does not divide: padding)."""
    saved, ckpt = saved_zero2 if (stage, before) == (2, 2) else (tmp_path / "saved", None)
    if ckpt is None:
        ckpt = _save(saved, before, stage)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    got = run_ranks(_resume_worker, after, resumed, stage, str(saved), timeout_s=300)[0]
    assert got["how"].startswith(f"re-partitioned from {before} to {after} ranks"), got["how"]

    assert got["model"].keys() == ckpt["model"].keys()
    for name, value in ckpt["model"].items():
        assert torch.equal(got["model"][name], value), name
    saved_state, resumed_state = ckpt["optimizer"]["state"], got["optimizer"]["state"]
    assert len(saved_state) > 50 and resumed_state.keys() == saved_state.keys()
    for i, entry in saved_state.items():
        assert entry.keys() == resumed_state[i].keys() == {"step", "exp_avg", "exp_avg_sq"}
        for key, value in entry.items():
            assert torch.equal(resumed_state[i][key], value), (i, key)
    # The next step from the re-partitioned state is the step the old world would have taken.
    for name, value in ckpt["after"].items():
        torch.testing.assert_close(got["after"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    moved = sum(not torch.equal(ckpt["after"][n], ckpt["model"][n]) for n in ckpt["model"])
    assert moved > 30, "the extra step changed nothing: the comparison above would prove nothing"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_checkpoint_without_the_full_state_names_the_way_out(tmp_path, saved_zero2):
    """A ZeRO checkpoint from before this change (no full optimiser state) cannot move: say so."""
    _, ckpt = saved_zero2
    old = tmp_path / "old"
    old.mkdir()
    torch.save({k: v for k, v in ckpt.items() if k != "optimizer"}, old / "ckpt.pt")
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    with pytest.raises(AssertionError, match="resumes only on 2 ranks"):
        run_ranks(_resume_worker, 1, resumed, 2, str(old), timeout_s=300)


# ------------------------------------------------------------------------------------------------
# The trainer: real torchrun jobs that resume on fewer, then more ranks
# ------------------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _train(world: int, overrides: list[str], timeout: float = 400):
    import subprocess
    import sys

    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
              "--monitor-interval", "0.5"] if world > 1 else [sys.executable]
    cmd = [*launch, str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/test.yaml"), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"
    return proc


def _crash_after(out: Path, step: int) -> None:
    """As if the job died right after the checkpoint of global step `step`: later ones never written."""
    import re

    ckpts = out / "checkpoints"
    for path in ckpts.glob("ckpt-*.pt*"):
        if int(re.search(r"-S(\d+)\.pt", path.name).group(1)) > step:
            path.unlink()
    for path in (ckpts / "ds").glob("ckpt-*") if (ckpts / "ds").is_dir() else ():
        if int(re.search(r"-S(\d+)$", path.name).group(1)) > step:
            import shutil
            shutil.rmtree(path)
    (ckpts / "latest").unlink()
    assert (ckpts / f"ckpt-E0000-S{step:06d}.pt").is_file()


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_training_resumes_on_fewer_then_more_ranks(tiny_shards, tmp_path, engine):
    """2 ranks train 3 of the 8 steps of epoch 0 and die. 1 rank resumes: the 10 batches the two had
    left become 10 steps; it dies after 2. 2 ranks resume: the 8 batches left become 4 steps each, then
    epoch 1 runs at 2 ranks (DeepSpeed: and epoch 2, resumed at the same size from DeepSpeed's own
    checkpoint). One MLflow run throughout; the LR follows the training progress."""
    import json

    from mlflow.tracking import MlflowClient

    from pipeline.config import load_config
    from pipeline.engine.schedule import lr_factor

    out, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [f"data.shards={tiny_shards}", f"output_dir={out}", f"tracking.uri={uri}", "tracking.timeout_s=60",
              "train.steps_per_epoch=null", "train.warmup_epochs=2", "train.scheduler=step",
              "checkpoint.keep_last=10", "eval.final=false"]
    if engine == "deepspeed":
        common += ["engine.backend=deepspeed", "engine.deepspeed.zero_optimization.stage=2"]
    _train(2, [*common, "train.epochs=1", "checkpoint.every_steps=3"], timeout=600)   # 8 steps per epoch
    _crash_after(out, 3)
    second = _train(1, [*common, "train.epochs=1", "checkpoint.every_steps=5"])
    assert "world size changed from 2 to 1 ranks in epoch 1 after step 3 of 8" in second.stderr
    assert "10 batches) is re-cut into 10 steps per rank" in second.stderr
    _crash_after(out, 5)
    _train(2, [*common, "train.epochs=2", "checkpoint.every_steps=100"])
    if engine == "deepspeed":
        # DeepSpeed's own directory next to every checkpoint file; at the same world size it is what
        # resumes (exact): one more epoch at 2 ranks.
        ds_dirs = sorted(p.name for p in (out / "checkpoints" / "ds").iterdir() if p.is_dir())
        assert (out / "checkpoints" / "latest").read_text().removesuffix(".pt") == ds_dirs[-1]
        again = _train(2, [*common, "train.epochs=3", "checkpoint.every_steps=100"])
        assert "resumed from ckpt-E0001-S000017.pt: epoch 2, step 0 of 8, global step 17; optimiser state: " \
               "DeepSpeed's own checkpoint" in again.stderr

    summary = json.loads((out / "summary.json").read_text())
    epochs = 3 if engine == "deepspeed" else 2
    assert summary["world_size"] == 2 and summary["epochs_completed"] == epochs
    assert summary["global_step"] == 3 + 2 + 4 + 8 * (epochs - 1)
    assert summary["resumed_from"] == ["ckpt-E0000-S000003.pt", "ckpt-E0000-S000005.pt",
                                       "ckpt-E0001-S000017.pt"][:epochs]
    restored = ("the checkpoint file's optimiser state" if engine == "ddp" else "re-partitioned from {} to {} ranks")
    changes = [{k: c[k] for k in ("global_step", "from_world_size", "to_world_size", "epoch_steps_before",
                                  "steps_done_before", "epoch_steps_after", "dropped_batches")}
               for c in summary["world_size_changes"]]
    assert changes == [
        {"global_step": 3, "from_world_size": 2, "to_world_size": 1, "epoch_steps_before": 8,
         "steps_done_before": 3, "epoch_steps_after": 10, "dropped_batches": 0},
        {"global_step": 5, "from_world_size": 1, "to_world_size": 2, "epoch_steps_before": 10,
         "steps_done_before": 2, "epoch_steps_after": 4, "dropped_batches": 0}]
    for change in summary["world_size_changes"]:
        assert change["optimizer_state"].startswith(restored.format(change["from_world_size"],
                                                                    change["to_world_size"]))

    # The log: every step once (the redone ones: the last record wins), its world size and LR.
    records = {}
    for line in (out / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        records[rec["global_step"]] = rec
    assert sorted(records) == list(range(1, summary["global_step"] + 1))
    assert [records[s]["world_size"] for s in records] == [2] * 3 + [1] * 2 + [2] * (summary["global_step"] - 5)
    losses = [records[s]["loss/total"] for s in sorted(records)]
    assert sum(losses[-4:]) < sum(losses[:4]), f"the loss did not decrease across the resumptions: {losses}"
    # Progress in epochs before each step, computed here from the cuts: 3 of 8 at 2 ranks, then 2 of the
    # remaining 10 at 1 rank, then 4 steps for the rest, then epoch 1.
    progress = ([s / 8 for s in range(3)] + [3 / 8 + 5 / 8 * s / 10 for s in range(2)]
                + [3 / 8 + 5 / 8 * (2 / 10 + 8 / 10 * s / 4) for s in range(4)]
                + [e + s / 8 for e in range(1, epochs) for s in range(8)])
    cfg = load_config(ROOT / "configs/test.yaml", ["data.shards=x", *common[3:], f"train.epochs={epochs}"])
    lrs = [records[s]["lr"] for s in sorted(records)]
    assert lrs == pytest.approx([cfg.train.lr * lr_factor(p, cfg.train) for p in progress], rel=1e-9)
    assert all(a < b for a, b in zip(lrs[:17], lrs[1:17])), "the warm-up must rise at every step, across both changes"

    # One MLflow run, continued by every resumption, whose charts show the world size.
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]]
    run = runs[0]
    assert run.data.tags["world_size"] == "2"
    assert run.data.tags["world_size_changes"] == "2->1 at step 3, 1->2 at step 5"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "world_size")}
    assert history[2] == 2 and history[4] == 1 and history[16] == 2
