"""The aligned branch learns: where its stripes start, how training shows whether it is alive, and how
well its shortest path aligns body parts (measured on synthetic pairs of known geometry)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.config import TrackingConfig
from pipeline.data import synthetic
from pipeline.engine.reporting import Reporter, branch_health
from pipeline.evaluation.alignment_check import alignment_accuracy, true_partners
from pipeline.losses import local_diagnostics
from pipeline.model.aligned import AlignedReID, unit_distance_gamma
from pipeline.tracking import Tracker


def stripe_distances(init: str) -> torch.Tensor:
    """Euclidean distances between the stripes of 8 different random images, in train mode."""
    torch.manual_seed(0)
    net = AlignedReID(5, "resnet18", last_stride=1, width=8, local_bn_init=init).train()
    local = net(torch.randn(8, 3, 64, 32))["local"]                       # [8, 4, 128]
    flat = local.reshape(-1, local.shape[2])
    d = torch.cdist(flat, flat)
    image = torch.arange(local.shape[0]).repeat_interleave(local.shape[1])
    return d[image[:, None] != image[None, :]].detach()


def test_stripe_scale_at_initialisation():
    """γ = 1 starts unrelated stripes ~9 apart (tanh flat: the branch cannot learn); unit-distance
    starts them ~1 apart, as its formula says; PyTorch 0.3's U(0, 1) lies between."""
    assert unit_distance_gamma(128) == pytest.approx(1 / math.sqrt(128 * (1 - 1 / math.pi)))
    one, uniform, unit = (stripe_distances(init).median().item() for init in ("one", "uniform", "unit-distance"))
    assert one > 6 and torch.tanh(torch.tensor(one / 2)) > 0.99
    assert 0.6 < unit < 1.2
    assert unit < uniform < one
    saturated = (torch.tanh(stripe_distances("unit-distance") / 2) > 0.99).float().mean().item()
    assert saturated == 0.0


def test_stripe_scale_only_for_the_head_that_has_it():
    for head in ("bn-relu-pool-conv", "pool-conv-bn"):     # no stripe scale to set: left as it is
        net = AlignedReID(3, "resnet18", width=4, local_head=head, local_bn_init="unit-distance")
        assert net.local_bn_init == "one"
        if net.local_bn.weight is not None:
            assert torch.equal(net.local_bn.weight, torch.ones_like(net.local_bn.weight))
    net = AlignedReID(3, "resnet18", width=4, local_dim=32, local_bn_init="unit-distance")
    assert torch.allclose(net.local_bn.weight, torch.full((32,), unit_distance_gamma(32)))
    with pytest.raises(ValueError, match="must be one of"):
        AlignedReID(3, "resnet18", width=4, local_bn_init="zero")


def test_diagnostics_tell_healthy_saturated_and_collapsed_apart():
    torch.manual_seed(1)
    anchors = torch.randn(6, 4, 16) * 0.1
    positives = anchors + 0.01 * torch.randn_like(anchors)
    negatives = torch.randn(6, 4, 16) * 0.1
    valid = torch.tensor([True] * 5 + [False])

    def diag(a, p, n):
        d_ap = torch.tanh(torch.cdist(a, p) / 2).diagonal(dim1=1, dim2=2).sum(1)
        d_an = torch.tanh(torch.cdist(a, n) / 2).diagonal(dim1=1, dim2=2).sum(1)
        stats = local_diagnostics(a, p, n, d_ap, d_an, valid)
        return {k: float(v) for k, v in stats.items()}

    healthy = diag(anchors, positives, negatives)
    assert healthy["pos_match"] < 0.05 < 0.2 < healthy["neg_match"] < 0.99
    assert healthy["saturated"] == 0.0 and healthy["precision"] == 1.0 and abs(healthy["neg_cosine"]) < 0.8
    assert branch_health({f"local/{k}": v for k, v in healthy.items()}) is None

    saturated = diag(anchors * 300, positives * 300 + 1.0, negatives * 300)
    assert saturated["saturated"] > 0.9 and saturated["pos_match"] > 0.95
    assert "saturated" in branch_health({f"local/{k}": v for k, v in saturated.items()})

    same = torch.ones(6, 4, 16)
    collapsed = diag(same, same + 1e-4, same * 1.001)
    assert collapsed["neg_cosine"] > 0.99 and collapsed["neg_match"] < 0.05
    assert "collapsed" in branch_health({f"local/{k}": v for k, v in collapsed.items()})


def test_reporter_warns_once(tmp_path, capsys):
    tracker = Tracker(TrackingConfig(enabled=False), is_main=True, output_dir=tmp_path)
    report = Reporter(tmp_path, tracker, is_main=True, log_every=1, epochs=2, steps_per_epoch=1, images_per_step=8)
    report.epoch_means = {"local/pos_match": 0.998, "local/neg_match": 0.999, "local/saturated": 0.94,
                          "local/neg_cosine": 0.1, "local/precision": 0.5}
    assert report.check_branch(1, local_warmup_epochs=3) is None     # the local triplet is still ramping up
    first = report.check_branch(3, local_warmup_epochs=3)
    assert first and "model.local_bn_init=unit-distance" in first
    assert report.check_branch(4) is None          # once only
    assert capsys.readouterr().err.count("WARNING: the aligned branch is saturated") == 1
    assert report.health_warning == first


def test_true_partners_by_hand():
    """Height 80, 4 stripes of 20 rows (centres 10, 30, 50, 70). A: person from row 0, 80 tall (body
    heights 1/8, 3/8, 5/8, 7/8); B: the same person from row 20, 40 tall: rows 25, 35, 45, 55."""
    partners = true_partners(np.array([[0.0, 80.0]]), np.array([[20.0, 40.0]]), 80, 4)
    assert partners.tolist() == [[1, 1, 2, 2]]
    # A shows stripe 0 above the head (top at 25): no partner; B's person shifted off the bottom.
    partners = true_partners(np.array([[25.0, 50.0]]), np.array([[60.0, 40.0]]), 80, 4)
    assert partners.tolist() == [[-1, 3, -1, -1]]


def test_render_placed_draws_what_render_view_draws():
    person = synthetic.random_person(np.random.default_rng(3))
    cam = synthetic.random_camera(np.random.default_rng(4))
    view = synthetic.render_view(person, cam, (64, 32), np.random.default_rng(5), 1.0)
    image, top, height = synthetic.render_placed(person, cam, (64, 32), np.random.default_rng(5), 1.0)
    assert np.array_equal(view, image)
    assert -0.1 * 64 < top < 0.3 * 64 and 0.6 * 64 < height < 2.0 * 64
    _, top, height = synthetic.render_placed(None, cam, (64, 32), np.random.default_rng(5), 1.0)
    assert math.isnan(top) and math.isnan(height)


def test_alignment_accuracy_on_an_untrained_network():
    torch.manual_seed(0)
    net = AlignedReID(3, "resnet18", last_stride=1, width=8).train()
    result = alignment_accuracy(net, (64, 32), pairs=6)
    assert net.training                                 # mode restored
    assert result["pairs"] == 6 and result["stripes"] == 4 and result["cells"] > 0
    for key in ("path", "diagonal", "path_exact", "diagonal_exact"):
        assert 0.0 <= result[key] <= 1.0
    assert result["path_exact"] <= result["path"] and result["diagonal_exact"] <= result["diagonal"]


def test_stripe_identity_loss_by_hand():
    """loss.local_id_weight with model.local_id: every stripe classified by the one shared classifier,
    cross-entropy (label smoothing) averaged over stripes and samples; off without the classifier."""
    from pipeline.config import LossConfig
    from pipeline.losses import AlignedReIDCriterion

    torch.manual_seed(0)
    net = AlignedReID(4, "resnet18", last_stride=1, width=8, local_id=True).train()
    out = net(torch.randn(8, 3, 64, 32))
    assert out["local_logits"].shape == (8, 4, 4)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    cfg = LossConfig(global_weight=0, local_weight=0, id_weight=0, local_id_weight=0.5, label_smoothing=0.1)
    loss, terms = AlignedReIDCriterion(cfg)(out, labels, labels)
    by_hand = sum(torch.nn.functional.cross_entropy(out["local_logits"][:, s], labels, label_smoothing=0.1)
                  for s in range(4)) / 4
    assert terms["local_id"].item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert loss.item() == pytest.approx(0.5 * by_hand.item(), rel=1e-5)
    loss.backward()
    assert net.local_classifier.weight.grad.abs().sum() > 0 and net.local_conv.weight.grad.abs().sum() > 0
    plain = AlignedReID(4, "resnet18", last_stride=1, width=8).train()
    assert plain.local_classifier is None and "local_logits" not in plain(torch.randn(2, 3, 64, 32))
