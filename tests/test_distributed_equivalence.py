"""Cross-rank exactness of the AlignedReID losses with real gloo process groups.

W spawned processes (W = 2, 3) each hold a slice of one global batch, run the real model (a ResNet-18
of base width 16, as a MutualPair) wrapped in DistributedDataParallel and the real criterion (global
triplet, local triplet, ID and both mutual terms together), and back-propagate. The mean of the rank
losses and every parameter gradient after DDP's averaging must equal one process holding the whole
batch, in float64 to a tight tolerance.

BatchNorm layers run in eval mode (running statistics) in every process: without SyncBatchNorm each
rank would normalise with its own slice's statistics (a legitimate difference from one process), and
SyncBatchNorm does not run on the CPU. Everything else is the real model and loss.

The batch has identities with unequal counts (1 to 4 images) and one identity with a single image,
whose anchor is excluded from the triplet terms; the ranks then hold different numbers of valid
anchors, which a per-rank normalisation would get wrong.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.config import LossConfig
from pipeline.distributed import all_reduce_sum, cleanup, init_distributed
from pipeline.losses import AlignedReIDCriterion
from pipeline.model import AlignedReID, MutualPair

from gloo_ranks import PROCESS_TIMEOUT_S, run_ranks

GLOBAL_PIDS = [0, 1, 2, 3, 0, 2, 4, 1, 2, 4, 0, 2]   # pid 3 has one image: no positive
NUM_CLASSES = 5


def make_model() -> MutualPair:
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(AlignedReID(NUM_CLASSES, backbone="resnet18", last_stride=1, width=16, local_dim=32,
                                local_id=True))
    model = MutualPair(*nets).double().train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
    return model


def make_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    images = torch.randn(len(GLOBAL_PIDS), 3, 64, 32, generator=gen, dtype=torch.float64)
    pids = torch.tensor(GLOBAL_PIDS)
    return images, pids, pids.clone()


def loss_config(margin: float | None, mining: str = "global") -> LossConfig:
    # Distinct weights so a term counted twice or dropped changes the result.
    return LossConfig(margin=margin, global_weight=1.0, local_weight=0.7, id_weight=0.5, local_id_weight=0.6,
                      label_smoothing=0.1,
                      mutual_prob_weight=0.8, mutual_metric_weight=0.3, local_mining=mining)


def _worker(rank: int, world: int, out_dir: str, margin: float | None, mining: str) -> None:
    info = init_distributed("gloo", timeout_s=60)
    assert info.world_size == world and info.rank == rank
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    images, pids, labels = make_batch()
    per_rank = len(GLOBAL_PIDS) // world
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    criterion = AlignedReIDCriterion(loss_config(margin, mining), mutual=True)
    loss, terms = criterion(ddp(images[part]), pids[part], labels[part])
    loss.backward()
    names = sorted(terms)
    summed = all_reduce_sum(torch.stack([loss.detach()] + [terms[n] for n in names]))
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    fingerprint = torch.stack([g.sum() for g in grads.values()])
    result = {"loss": summed[0] / world, "terms": dict(zip(names, (summed[1:] / world).unbind())),
              "fingerprint": fingerprint}
    if rank == 0:
        result["grads"] = grads
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    cleanup()


def single_process(margin: float | None, mining: str) -> dict:
    model = make_model()
    images, pids, labels = make_batch()
    loss, terms = AlignedReIDCriterion(loss_config(margin, mining), mutual=True)(model(images), pids, labels)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss.detach(), "terms": terms, "grads": grads}


@pytest.mark.slow
@pytest.mark.timeout(PROCESS_TIMEOUT_S + 60)
@pytest.mark.parametrize("world,margin,mining", [(2, 0.3, "global"), (3, None, "local")])
def test_ranks_equal_single_process(tmp_path: Path, world: int, margin: float | None, mining: str) -> None:
    """mining: the local triplets' pairs mined on the global distance (the paper) or on the aligned
    local distance itself (loss.local_mining=local), computed over the gathered batch."""
    ranks = run_ranks(_worker, world, tmp_path, margin, mining)
    ref = single_process(margin, mining)
    # Every term is active and non-trivial, so the comparison covers all of them.
    for name in ("global_triplet", "local_triplet", "id", "local_id", "mutual_prob", "mutual_metric"):
        assert ref["terms"][name] > 1e-6, name
    torch.testing.assert_close(ranks[0]["loss"], ref["loss"], rtol=1e-10, atol=1e-12)
    for name, value in ref["terms"].items():
        if name != "precision" and not name.startswith("local/"):  # per-rank statistics, not additive
            torch.testing.assert_close(ranks[0]["terms"][name], value, rtol=1e-10, atol=1e-12, msg=name)
    grads = ranks[0]["grads"]
    assert grads.keys() == ref["grads"].keys()
    assert len(grads) > 100  # both networks: trunk, neck, classifier and local branch
    for name, grad in ref["grads"].items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)
    for other in ranks[1:]:  # DDP leaves the same averaged gradients on every rank
        torch.testing.assert_close(other["fingerprint"], ranks[0]["fingerprint"], rtol=0, atol=0)
