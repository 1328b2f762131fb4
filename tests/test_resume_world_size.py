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
