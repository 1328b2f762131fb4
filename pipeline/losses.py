"""AlignedReID losses over the global batch of all ranks: batch-hard triplet on global features, local
triplet on the same mined pairs with the aligned local distance, identity cross-entropy with label
smoothing, and the two deep-mutual-learning terms.

Cross-rank exactness. Every rank gathers the global features (differentiably: the backward of
`all_gather_with_grad`, a reduce-scatter, sums every rank's gradient into the owner's rows) and the pids
of its mining group, then computes the loss of ITS OWN anchors (rows) against the WHOLE gathered batch
(columns): positives and negatives come from every rank, and each (anchor, candidate) term is computed on
exactly one rank. The local triplet needs only the stripes of each own anchor's mined positive and
negative: `fetch_rows` brings just those rows (2A per rank, fewer when shared) from their owners and
routes their gradients back (loss.local_mining=local mines on the full local distance, so that path also
gathers every stripe, without gradient). Features travel in the dtype the model computed them in (bf16
under autocast); the loss arithmetic runs in at least float32.

Mining groups (loss.mining_ranks = G > 0, G dividing the world size W): all of the above happens within
blocks of G consecutive ranks; 0 (or W) is one group of all ranks, the exact loss. Below, "the group's
batch" has N = G * A samples, and the factor G is the group size. A rank's loss must be G times its share
of the group's single-process loss L_g: the group's ranks then sum to G * L_g, DDP divides the sum over
all W ranks by W, and the averaged gradient is that of (G / W) * sum over groups of L_g = the MEAN OVER
GROUPS of each group's exact loss (each group's anchors mined and normalised within the group only;
with G = W, the exact single-process loss of the global batch):

* per-sample terms (ID, mutual KL): sum over own samples / A            (= G * sum / N)
* mutual metric: sum over own rows of the N x N matrices / (A * N)      (= G * sum / N^2)
* triplet terms: sum over own VALID anchors * G / V, where V is the number of valid anchors in the
  GROUP's batch (an anchor is valid when some other sample shares its pid and some sample does not).
  V is computed identically on every member from the gathered pids, at no extra communication. Dividing
  by the rank's own valid count instead would weight anchors differently on ranks with different
  counts and break exactness. When every anchor is valid this is the plain "sum over own anchors / A".

Anchors that are not valid keep a zero weight rather than being dropped, so the local branch always
takes part in the graph (DDP needs every parameter used in every step). tests/test_distributed_
equivalence.py (the model under DDP) and tests/test_loss_exchange.py (8 ranks, groups) check the
exactness with real gloo process groups.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .alignment import EPS, element_distance, local_distance, paired_local_distance
from .config import LossConfig
from .distributed import all_gather_no_grad, all_gather_with_grad, fetch_rows, rank_group

TERMS = ("global_triplet", "local_triplet", "id", "local_id", "mutual_prob", "mutual_metric")
EXCHANGES = ("rows", "gather_all")   # gather_all: the former exchange (baselines, tests)
# Is the aligned branch alive? Detached statistics of the local triplets (reported as `local/<name>`):
DIAGNOSTICS = ("pos_match", "neg_match", "saturated", "neg_cosine", "precision")
SATURATED = 0.99      # an element distance above this has a tanh slope below 0.01: it no longer learns


@torch.no_grad()
def local_diagnostics(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                      d_ap: torch.Tensor, d_an: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Whether the local branch learns, from the stripes of the local triplets ([A, S, L] each), their
    aligned distances d_ap, d_an [A] and the valid anchors [A] (bool):

    * pos_match / neg_match: the median, over anchor stripes, of each stripe's best-matching (smallest)
      element distance to the mined positive's / negative's stripes. A healthy branch keeps pos_match
      well below 1 and neg_match above it; both near 1 is saturation, both near 0 collapse;
    * saturated: the share of all element distances (both pairs) above 0.99, where tanh has no slope;
    * neg_cosine: the mean cosine between each anchor stripe and its best-matching negative stripe
      (near 1: different people's stripes have collapsed onto one direction);
    * precision: how often the local distance puts the mined positive before the mined negative."""
    keep = valid.nonzero().squeeze(1)
    if keep.numel() == 0:
        return {name: torch.zeros((), dtype=d_ap.dtype, device=d_ap.device) for name in DIAGNOSTICS}
    a, p, n = anchors[keep], positives[keep], negatives[keep]
    e_ap = element_distance(torch.cdist(a, p).pow(2))             # [V, S, S] element distances
    e_an = element_distance(torch.cdist(a, n).pow(2))
    best_an, j = e_an.min(2)
    matched = n.gather(1, j[..., None].expand(-1, -1, n.shape[2]))
    cosine = torch.nn.functional.cosine_similarity(a, matched, dim=2, eps=EPS)
    return {"pos_match": e_ap.min(2).values.median(), "neg_match": best_an.median(),
            "saturated": torch.cat([e_ap.flatten(), e_an.flatten()]).gt(SATURATED).to(d_ap.dtype).mean(),
            "neg_cosine": cosine.mean(),
            "precision": (d_ap[keep] < d_an[keep]).to(d_ap.dtype).mean()}


def pairwise_euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances [A, D] x [N, D] -> [A, N]; the clamp keeps the gradient finite at 0."""
    sq = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1) - 2.0 * a @ b.t()
    return sq.clamp_min(EPS).sqrt()


def valid_anchors(pids: torch.Tensor) -> torch.Tensor:
    """[N] bool: the sample has a positive besides itself and at least one negative in the batch."""
    _, inverse, counts = torch.unique(pids, return_inverse=True, return_counts=True)
    return (counts[inverse] >= 2) & (counts.numel() > 1)


def batch_hard_mining(dist: torch.Tensor, anchor_pids: torch.Tensor, pids: torch.Tensor,
                      anchor_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hardest positive and negative per anchor, with masks (any number of images per identity).

    dist [A, N]: anchors (rows) against candidates (columns); anchor_pids [A]; pids [N];
    anchor_index [A]: the column of each anchor itself (excluded from its positives).
    Returns (pos_index [A], neg_index [A], valid [A]); an anchor without a positive besides itself or
    without a negative is not valid and its indices are arbitrary (but in range). Ties go to the
    lowest column, the same on every rank and in a single process."""
    same = anchor_pids[:, None] == pids[None, :]
    is_self = torch.zeros_like(same)
    is_self[torch.arange(len(anchor_index), device=dist.device), anchor_index] = True
    positive, negative = same & ~is_self, ~same
    d = dist.detach()
    pos_index = d.masked_fill(~positive, -torch.inf).argmax(1)
    neg_index = d.masked_fill(~negative, torch.inf).argmin(1)
    return pos_index, neg_index, positive.any(1) & negative.any(1)


def triplet(d_ap: torch.Tensor, d_an: torch.Tensor, margin: float | None) -> torch.Tensor:
    """Per-anchor triplet loss: hinge with `margin`, or the soft margin log(1 + e^(d_ap - d_an))."""
    if margin is None:
        return F.softplus(d_ap - d_an)
    return F.relu(d_ap - d_an + margin)


def _as_float(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.dtype != dtype else t


class AlignedReIDCriterion:
    """`criterion(outputs, pids, labels) -> (loss, terms)`.

    outputs: the model's train-mode dict (`global` [A, D], `local` [A, S, L], `logits` [A, C], and
    `local_logits` [A, S, C] with model.local_id) or, with `mutual`, the list of the two networks'
    dicts. pids: [A] identity ids (mining), labels: [A] class
    indices (ID loss), both for this rank's samples. Every rank must call it with the same A.

    loss: this rank's loss (see the module docstring for the normalisation that makes DDP's averaged
    gradient equal the single-process one). terms: detached scalars `global_triplet`, `local_triplet`,
    `id`, `mutual_prob`, `mutual_metric` (unweighted; summed over the two networks of a mutual pair;
    each is this rank's share, so their mean over ranks is the single-process value; with mining groups,
    the mean over groups of each group's value), `precision` (fraction of this rank's valid anchors with
    d(a, n) > d(a, p), averaged over networks), with the local triplet the branch's health
    `local/<name>` (see `local_diagnostics`; this rank's figures, the trainer reports their mean over
    ranks) and `total`.
    A term with weight 0 is not computed (reported as 0). `last_timing` holds the wall time of the
    last call: `comm_s` (feature, stripe and pid exchanges, forward), `dp_s` (the aligned local
    distances' dynamic programme, forward) and `loss_s` (the whole forward of the loss);
    `synchronize=True` waits for the GPU around them for exact figures."""

    def __init__(self, loss_cfg: LossConfig, mutual: bool = False, synchronize: bool = False,
                 exchange: str = "rows"):
        self.cfg, self.mutual, self.synchronize = loss_cfg, mutual, synchronize
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange must be one of {EXCHANGES}; got {exchange!r}")
        self.exchange = exchange
        # Collective on first use for a group size: made here, at start-up, on every rank alike. Raises,
        # naming loss.mining_ranks, when the world size is not divisible by it.
        self.group = rank_group(loss_cfg.mining_ranks)
        weights = {"global_triplet": loss_cfg.global_weight, "local_triplet": loss_cfg.local_weight,
                   "id": loss_cfg.id_weight, "local_id": loss_cfg.local_id_weight,
                   "mutual_prob": loss_cfg.mutual_prob_weight if mutual else 0.0,
                   "mutual_metric": loss_cfg.mutual_metric_weight if mutual else 0.0}
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"loss weights must be >= 0; got {weights}")
        if not any(weights.values()):
            raise ValueError("every loss weight is 0 (loss.global_weight, loss.local_weight, loss.id_weight"
                             + (", loss.mutual_prob_weight, loss.mutual_metric_weight" if mutual else "")
                             + "); set at least one > 0")
        self.weights = weights
        self.last_timing: dict[str, float] = {}
        # Multiplies the local triplet weight (the trainer ramps it during loss.local_warmup_epochs).
        self.local_scale = 1.0

    def _clock(self, device: torch.device) -> float:
        if self.synchronize and device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def _check(self, outputs, pids: torch.Tensor, labels: torch.Tensor) -> list[dict]:
        nets = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        if len(nets) != (2 if self.mutual else 1):
            wanted = "a list of 2 output dicts (MutualPair)" if self.mutual else "one output dict"
            raise ValueError(f"AlignedReIDCriterion(mutual={self.mutual}) expects {wanted}; got {len(nets)}")
        count = pids.shape[0]
        for i, net in enumerate(nets):
            missing = {"global", "local", "logits"} - set(net)
            if missing:
                raise ValueError(f"model output {i} lacks {sorted(missing)}; the criterion needs the "
                                 f"train-mode outputs (call model.train())")
            for key in ("global", "local", "logits"):
                if net[key].shape[0] != count:
                    raise ValueError(f"model output {i}['{key}'] has {net[key].shape[0]} rows but pids has "
                                     f"{count}")
        if labels.shape[0] != count:
            raise ValueError(f"labels has {labels.shape[0]} rows but pids has {count}")
        return nets

    def __call__(self, outputs, pids: torch.Tensor, labels: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        nets = self._check(outputs, pids, labels)
        device = pids.device
        start = self._clock(device)
        with torch.autocast(device.type, enabled=False):
            loss, terms, comm_s = self._compute(nets, pids, labels)
        self.last_timing = {"comm_s": comm_s, "dp_s": self._dp_s, "loss_s": self._clock(device) - start}
        return loss, terms

    def _exchange(self, nets: list[dict], dtype: torch.dtype, local: bool):
        """The features the loss needs from the other members of this rank's mining group.

        Returns (g_all, local_rows): g_all, per network, the group's global features [N, D] in `dtype`
        (differentiable; exchanged in the features' own dtype, the backward a reduce-scatter), and
        local_rows(i, index) -> network i's stripes of the group-batch rows `index` [M, S, L] in `dtype`:
        fetched differentiably from their owners, only those rows; index=None: every row, without gradient
        (for loss.local_mining=local, which mines on the full local distance). Collective: every member
        must make the same calls in the same order.

        exchange='gather_all' is the former exchange (benchmarks/scaling.py's baseline, and tests): every
        sample's global and local features, in `dtype`, gathered together, the backward an all-reduce."""
        if self.exchange == "gather_all":
            parts = [_as_float(net["global"], dtype) for net in nets]
            if local:
                parts += [_as_float(net["local"], dtype).flatten(1) for net in nets]
            gathered = all_gather_with_grad(torch.cat(parts, 1), self.group, backward="all_reduce")
            pieces = torch.split(gathered, [p.shape[1] for p in parts], dim=1)
            l_all = [p.view(p.shape[0], *net["local"].shape[1:]) for p, net in zip(pieces[len(nets):], nets)]

            def gathered_rows(i: int, index: torch.Tensor | None) -> torch.Tensor:
                return l_all[i].detach() if index is None else l_all[i][index]
            return list(pieces[:len(nets)]), gathered_rows
        # One gather for every network's global features, in the dtype they were computed in.
        width = nets[0]["global"].shape[1]
        native = torch.promote_types(nets[0]["global"].dtype, nets[-1]["global"].dtype)
        g_cat = all_gather_with_grad(torch.cat([_as_float(net["global"], native) for net in nets], 1),
                                     self.group, out_dtype=dtype)
        g_all = list(torch.split(g_cat, width, dim=1))

        def fetched_rows(i: int, index: torch.Tensor | None) -> torch.Tensor:
            stripes = nets[i]["local"]
            if index is None:
                return _as_float(all_gather_no_grad(stripes.detach(), self.group), dtype)
            return fetch_rows(stripes, index, self.group, out_dtype=dtype)
        return g_all, fetched_rows

    def _compute(self, nets: list[dict], pids: torch.Tensor, labels: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
        w = self.weights
        # Losses in at least float32, whatever precision the model ran in.
        dtype = torch.promote_types(torch.promote_types(nets[0]["global"].dtype, nets[0]["local"].dtype),
                                    torch.float32)
        count, device = pids.shape[0], pids.device
        mine = w["global_triplet"] > 0 or w["local_triplet"] > 0
        sums = {name: torch.zeros((), dtype=dtype, device=device) for name in TERMS}
        self._dp_s = 0.0
        precision = torch.zeros((), dtype=dtype, device=device)
        diagnostics: dict[str, torch.Tensor] = {}
        comm_s = 0.0

        if mine or w["mutual_metric"] > 0:
            t0 = self._clock(device)
            g_all, local_rows = self._exchange(nets, dtype, w["local_triplet"] > 0)
            all_pids = all_gather_no_grad(pids, self.group)
            comm_s = self._clock(device) - t0
            first = self.group.rank * count
            own = slice(first, first + count)
            dists = [pairwise_euclidean(g[own], g) for g in g_all]           # [A, N] per network
            if mine:
                anchor_index = torch.arange(first, first + count, device=device)
                # V, the group batch's valid anchors: the same on every member (see the module docstring).
                scale = self.group.size / valid_anchors(all_pids).sum().clamp_min(1).to(dtype)
                for i, dist in enumerate(dists):
                    pos, neg, valid = batch_hard_mining(dist, pids, all_pids, anchor_index)
                    weight = valid.to(dtype) * scale
                    d_ap = dist.gather(1, pos[:, None]).squeeze(1)
                    d_an = dist.gather(1, neg[:, None]).squeeze(1)
                    correct = ((d_an > d_ap) & valid).sum().to(dtype)
                    precision = precision + correct / valid.sum().clamp_min(1) / len(nets)
                    if w["global_triplet"] > 0:
                        sums["global_triplet"] += (triplet(d_ap, d_an, self.cfg.margin) * weight).sum()
                    if w["local_triplet"] > 0:
                        # Aligned local distance of each own anchor to its mined positive and negative.
                        anchors = _as_float(nets[i]["local"], dtype)
                        lpos, lneg = pos, neg
                        if self.cfg.local_mining == "local":   # the local branch mines its own triplets
                            with torch.no_grad():
                                t1 = self._clock(device)
                                every = local_rows(i, None)    # all of the group's stripes, no gradient
                                comm_s += self._clock(device) - t1
                                t1 = self._clock(device)
                                local_all = local_distance(anchors.detach(), every)
                                self._dp_s += self._clock(device) - t1
                            lpos, lneg, _ = batch_hard_mining(local_all, pids, all_pids, anchor_index)
                        t1 = self._clock(device)
                        mined = local_rows(i, torch.cat([lpos, lneg]))
                        comm_s += self._clock(device) - t1
                        t1 = self._clock(device)
                        local_d = paired_local_distance(torch.cat([anchors, anchors]), mined)
                        self._dp_s += self._clock(device) - t1
                        loss_i = triplet(local_d[:count], local_d[count:], self.cfg.margin)
                        sums["local_triplet"] += (loss_i * weight).sum()
                        stats = local_diagnostics(anchors.detach(), mined[:count].detach(),
                                                  mined[count:].detach(), local_d[:count].detach(),
                                                  local_d[count:].detach(), valid)
                        for name, value in stats.items():
                            diagnostics[name] = diagnostics.get(name, 0.0) + value / len(nets)
            if w["mutual_metric"] > 0:
                for i, dist in enumerate(dists):
                    partner = dists[1 - i].detach()
                    sums["mutual_metric"] += (dist - partner).pow(2).sum() / (count * dist.shape[1])

        for i, net in enumerate(nets):
            logits = _as_float(net["logits"], dtype)
            if w["id"] > 0:
                sums["id"] += F.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)
            if w["local_id"] > 0 and "local_logits" in net:   # every stripe classified, mean over stripes
                stripe_logits = _as_float(net["local_logits"], dtype)
                sums["local_id"] += F.cross_entropy(stripe_logits.flatten(0, 1),
                                                    labels.repeat_interleave(stripe_logits.shape[1]),
                                                    label_smoothing=self.cfg.label_smoothing)
            if w["mutual_prob"] > 0:
                # KL(p_partner || p_self), partner detached, summed over classes, mean over own samples.
                partner = F.log_softmax(_as_float(nets[1 - i]["logits"], dtype), 1).detach()
                sums["mutual_prob"] += F.kl_div(F.log_softmax(logits, 1), partner, reduction="sum",
                                                log_target=True) / count

        scale = {"local_triplet": self.local_scale}
        used = [name for name in TERMS if w[name] > 0 and (name != "local_id" or "local_logits" in nets[0])]
        if not used:
            raise ValueError("loss.local_id_weight is the only weight > 0, but the model has no stripe "
                             "classifier: set model.local_id=true or another loss weight > 0")
        loss = sum(w[name] * scale.get(name, 1.0) * sums[name] for name in used)
        terms = {name: value.detach() for name, value in sums.items()}
        terms["precision"] = precision.detach()
        terms.update({f"local/{name}": value for name, value in diagnostics.items()})
        terms["total"] = loss.detach()
        return loss, terms, comm_s
