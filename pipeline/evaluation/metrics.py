"""Ranking metrics (CMC, mAP, mINP) under the Market-1501 protocol, in bounded memory.

Protocol, per query: gallery items with the query's pid AND camera, and junk (pid -1), are removed;
what is left is ranked by distance. CMC counts only the first correct match; AP is the mean over the
correct matches of (correct matches so far / rank); mINP averages (number of correct matches / rank of
the last one). Queries without any correct match left are skipped (``valid_queries`` counts the rest).

Ties: gallery items are ordered by (distance, gallery index), which is what a *stable* argsort of each
distance row gives. Every figure here is exactly the one that order produces.

Why no argsort: a full q x g argsort needs 8 bytes per pair (19 GB on MSMT17) and O(G log G) per query.
Only the ranks of the correct matches matter, and the rank of a match is one plus the number of valid
gallery items ahead of it. Per query the few matches are found and sorted; only the valid non-matches
at or before the last match (the "window") can be ahead of any of them, and each is placed among the
matches with a binary search (``searchsorted``); a histogram of those placements, cumulated, gives how
many non-matches precede each match. The cost is a few vectorised passes over the chunk plus
O(window · log M), and the window is small for any useful model (its size is the last match's rank,
i.e. what mINP measures). Queries are processed in chunks, so memory is O(chunk x G) whatever the
number of queries.
:func:`rank_metrics_from_features` goes further and computes each chunk's distances on the fly, so the
q x g matrix never exists at all.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

METRICS = ("euclidean", "cosine")
# global+local: both distances on a common scale (each divided by its largest possible value, see
# `combine_scaled`); global+local-sum: the reproductions' plain sum, kept for comparison.
DISTANCES = ("global", "local", "global+local", "global+local-sum")
USES_GLOBAL = ("global", "global+local", "global+local-sum")
USES_LOCAL = ("local", "global+local", "global+local-sum")


def local_distance_bound(stripes: torch.Tensor) -> float:
    """The largest aligned local distance stripes [N, S, C] can have: the longest path, 2S - 1 cells,
    times the largest element distance, tanh(||f - g|| / 2) < 1, or tanh(1) when every stripe is unit
    length (||f - g|| <= 2)."""
    s = stripes.shape[1]
    unit = stripes.numel() > 0 and bool(((stripes.norm(dim=2) - 1).abs() < 1e-3).all())
    return (2 * s - 1) * (float(torch.tanh(torch.tensor(1.0))) if unit else 1.0)


def combine_scaled(d_global: torch.Tensor, d_local: torch.Tensor, local_bound: float) -> torch.Tensor:
    """global+local on a common scale: d_global / 2 + d_local / local_bound, each term in [0, 1].

    2 is the largest distance of L2-normalised global features (Euclidean, and cosine distance
    1 - cos); `local_bound` is `local_distance_bound` of the stripes. The plain sum of the
    reproductions lets the local path (up to 2S - 1, i.e. 31 with 16 stripes) swamp the global term
    (at most 2)."""
    return d_global / 2.0 + d_local / local_bound
# Default chunk: about this many q x g cells per step (a few tens of MB of temporaries).
CHUNK_CELLS = 1 << 22
FEATURE_CHUNK = 256

ArrayLike = Any  # numpy array, torch tensor or sequence


def as_tensor(x: ArrayLike, name: str, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A CPU tensor view of `x` (numpy arrays are shared, not copied)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name}: expected a numpy array or torch tensor, got "
                            f"{type(x).__name__} ({exc})") from None
    t = t.cpu()
    return t if dtype is None else t.to(dtype)


def _labels(x: ArrayLike, name: str, n: int, n_name: str) -> torch.Tensor:
    t = as_tensor(x, name)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D integer array, got dtype {t.dtype} shape "
                         f"{tuple(t.shape)}")
    if t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} entries but {n_name} has {n}; "
                         f"pass one label per row/column")
    return t.to(torch.int64)


def _check_finite(x: torch.Tensor, name: str) -> None:
    # min/max propagate NaN and show inf: one cheap pass instead of isfinite's temporaries.
    if x.numel() and not all(map(torch.isfinite, torch.aminmax(x))):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} has {bad} non-finite values (NaN/inf); check the model outputs "
                         f"(e.g. a diverged checkpoint) before evaluating")


def _auto_chunk(chunk_size: int | None, num_gallery: int) -> int:
    if chunk_size is None:
        return max(1, CHUNK_CELLS // max(1, num_gallery))
    if chunk_size < 1:
        raise ValueError(f"chunk_size is {chunk_size}; must be >= 1 (or None for automatic)")
    return chunk_size


# --------------------------------------------------------------------------------------------------
# Distances
# --------------------------------------------------------------------------------------------------
class DistanceTo:
    """Distances from any images to a fixed set `y` (the gallery, say), in one of the AlignedReID modes.

    'global': Euclidean or cosine distance of the global features; 'local': the aligned local distance
    of the stripe features (shortest path, pipeline.alignment); 'global+local': both on a common scale
    (`combine_scaled`: global features must be L2-normalised, as `evaluate` makes them);
    'global+local-sum': their plain sum (the reproductions' test distance). The work
    that depends on `y` alone (squared norms, unit vectors) is done once here, not once per chunk of
    queries: on MSMT17 that would be a 0.7 GB pass, and as many temporaries, per chunk."""

    def __init__(self, yf: torch.Tensor | None, metric: str = "euclidean",
                 y_local: torch.Tensor | None = None, distance: str = "global"):
        if distance not in DISTANCES:
            raise ValueError(f"distance is {distance!r}; must be one of {list(DISTANCES)}")
        if metric not in METRICS:
            raise ValueError(f"metric is {metric!r}; must be one of {list(METRICS)}")
        self.metric, self.distance, self.y_local = metric, distance, y_local
        # global+local: the local term's bound, from the set y (the same stripes model as the rows).
        self.local_bound = local_distance_bound(y_local) if distance == "global+local" else None
        self.y = self.y_sq = None
        if distance in USES_GLOBAL:
            self.y = yf if metric == "euclidean" else F.normalize(yf, dim=1)
            self.y_sq = (yf * yf).sum(1) if metric == "euclidean" else None

    def __call__(self, xf: torch.Tensor | None = None, x_local: torch.Tensor | None = None,
                 cols: torch.Tensor | None = None) -> torch.Tensor:
        """[m, n] distances of the rows `xf` / `x_local` to y (or to y[cols] only)."""
        out = None
        if self.y is not None:
            y = self.y if cols is None else self.y[cols]
            if self.metric == "euclidean":
                y_sq = self.y_sq if cols is None else self.y_sq[cols]
                out = ((xf * xf).sum(1, keepdim=True) + y_sq[None]).addmm_(xf, y.t(), alpha=-2.0)
                out = out.clamp_(min=0).sqrt_()
            else:
                out = torch.ones((xf.shape[0], y.shape[0]), dtype=xf.dtype).addmm_(
                    F.normalize(xf, dim=1), y.t(), alpha=-1.0)
        if self.distance in USES_LOCAL:
            from pipeline.alignment import local_distance  # only needed for the local modes
            y_local = self.y_local if cols is None else self.y_local[cols]
            d_local = local_distance(x_local, y_local)
            if out is None:
                out = d_local
            elif self.distance == "global+local":
                out = combine_scaled(out, d_local.to(out.dtype), self.local_bound)
            else:
                out = out + d_local.to(out.dtype)
        return out


def pairwise_distance(x: torch.Tensor, y: torch.Tensor, metric: str = "euclidean") -> torch.Tensor:
    """[m, d] x [n, d] -> [m, n]: Euclidean distance, or cosine distance (1 - cosine similarity)."""
    return DistanceTo(y, metric)(x)


def feature_distance(xf: torch.Tensor | None, yf: torch.Tensor | None, *, metric: str = "euclidean",
                     x_local: torch.Tensor | None = None, y_local: torch.Tensor | None = None,
                     distance: str = "global") -> torch.Tensor:
    """Distances between two sets of images in one of the AlignedReID modes (see DistanceTo)."""
    return DistanceTo(yf, metric, y_local, distance)(xf, x_local)


def check_features(qf: ArrayLike | None, gf: ArrayLike | None, local: tuple | None,
                   distance: str) -> tuple[torch.Tensor | None, torch.Tensor | None,
                                           torch.Tensor | None, torch.Tensor | None]:
    """Validate the features a distance mode needs; returns (qf, gf, q_local, g_local) tensors."""
    if distance not in DISTANCES:
        raise ValueError(f"distance is {distance!r}; must be one of {list(DISTANCES)}")
    q_local = g_local = None
    if distance in USES_GLOBAL:
        qf, gf = as_tensor(qf, "qf"), as_tensor(gf, "gf")
        if qf.dim() != 2 or gf.dim() != 2 or qf.shape[1] != gf.shape[1]:
            raise ValueError(f"qf {tuple(qf.shape)} and gf {tuple(gf.shape)} must be [N, D] with the "
                             f"same D")
        if not qf.dtype.is_floating_point:
            qf, gf = qf.float(), gf.float()
        gf = gf.to(qf.dtype)
        _check_finite(qf, "qf")
        _check_finite(gf, "gf")
    else:
        qf = gf = None
    if distance in USES_LOCAL:
        if local is None or len(local) != 2:
            raise ValueError(f"distance={distance!r} needs local=(q_local, g_local) stripe features "
                             f"[N, S, C]")
        q_local, g_local = as_tensor(local[0], "q_local"), as_tensor(local[1], "g_local")
        if q_local.dim() != 3 or g_local.dim() != 3 or q_local.shape[1:] != g_local.shape[1:]:
            raise ValueError(f"q_local {tuple(q_local.shape)} and g_local {tuple(g_local.shape)} must "
                             f"be [N, S, C] with the same S and C")
        q_local, g_local = q_local.float(), g_local.float()
        _check_finite(q_local, "q_local")
        _check_finite(g_local, "g_local")
        if qf is not None and (q_local.shape[0] != qf.shape[0] or g_local.shape[0] != gf.shape[0]):
            raise ValueError(f"local features ({q_local.shape[0]}, {g_local.shape[0]} rows) and "
                             f"global features ({qf.shape[0]}, {gf.shape[0]} rows) disagree")
    elif local is not None:
        raise ValueError(f"local features were given but distance={distance!r} does not use them; "
                         f"pass distance='local' or 'global+local'")
    return qf, gf, q_local, g_local


# --------------------------------------------------------------------------------------------------
# Core: ranks of the correct matches for a chunk of queries
# --------------------------------------------------------------------------------------------------
def _chunk_stats(dist: torch.Tensor, q_pids: torch.Tensor, q_cams: torch.Tensor,
                 g_pids: torch.Tensor, g_cams: torch.Tensor, g_keep: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For c queries against the whole gallery: (has_match [c] bool, first_rank [c], AP [c], INP [c]).

    Ranks are 1-based among the valid gallery items, ordered by (distance, gallery index).
    g_keep: gallery items that are not junk (pid != -1).
    """
    c, n_g = dist.shape
    # Correct matches (same pid, other camera, not junk): few, so found as a sparse list.
    same_pid = q_pids[:, None] == g_pids[None, :]
    rows, cols = same_pid.nonzero(as_tuple=True)
    keep = (q_cams[rows] != g_cams[cols]) & g_keep[cols]
    rows, cols = rows[keep], cols[keep]
    n_match = torch.bincount(rows, minlength=c)
    has_match = n_match > 0
    m = int(n_match.max()) if rows.numel() else 0
    if m == 0:
        zeros = torch.zeros(c, dtype=torch.float64)
        return has_match, torch.zeros(c, dtype=torch.int64), zeros, zeros

    # Matches of each query packed into [c, m] (ascending gallery index; padding: +inf, index n_g),
    # then sorted stably by distance, which gives (distance, index) order.
    slot = torch.arange(rows.numel()) - (torch.cumsum(n_match, 0) - n_match)[rows]
    m_dist = torch.full((c, m), float("inf"), dtype=dist.dtype)
    m_idx = torch.full((c, m), n_g, dtype=torch.int64)
    m_dist[rows, slot] = dist[rows, cols]
    m_idx[rows, slot] = cols
    m_dist, order = torch.sort(m_dist, dim=1, stable=True)
    m_idx = torch.gather(m_idx, 1, order)

    # Only valid non-matches (other pid, not junk) at or before a query's last match move any rank:
    # the "window". Its size is what a ranking costs, small for a good model.
    last = torch.gather(m_dist, 1, (n_match - 1).clamp(min=0)[:, None])
    last[~has_match] = float("-inf")
    window = (dist <= last) & ~same_pid & g_keep[None, :]
    w_rows, w_cols = window.nonzero(as_tuple=True)
    values = dist[w_rows, w_cols]
    # r = number of the query's matches ordered before the item (binary search among them).
    if w_rows.numel() * 8 > c * n_g:    # a poor ranking: one batched search over the whole chunk
        r = torch.searchsorted(m_dist, dist.contiguous())[w_rows, w_cols]
    else:
        r = torch.searchsorted(m_dist[w_rows], values[:, None])[:, 0]
    # Equal distances: matches with a smaller index also come first. Rare, so fixed up sparsely.
    padded = torch.cat([m_dist, torch.full((c, 1), float("inf"), dtype=dist.dtype)], 1)
    tie = torch.nonzero(padded[w_rows, r] == values)[:, 0]
    if tie.numel():
        t_q, t_g, lo = w_rows[tie], w_cols[tie], r[tie]
        hi = torch.searchsorted(m_dist[t_q], values[tie][:, None], right=True)[:, 0]
        pos = lo[:, None] + torch.arange(int((hi - lo).max()))[None, :]
        before = (m_idx[t_q[:, None], pos.clamp(max=m - 1)] < t_g[:, None]) & (pos < hi[:, None])
        r[tie] = lo + before.sum(1)

    # Histogram of those placements, cumulated: ahead[q, i] = number of valid non-matches ranked
    # before match i (0-based, sorted).
    hist = torch.zeros(c * (m + 1), dtype=torch.int64)
    hist.index_add_(0, w_rows * (m + 1) + r, torch.ones_like(r))
    ahead = torch.cumsum(hist.view(c, m + 1), 1)[:, :m]
    pos1 = torch.arange(1, m + 1, dtype=torch.int64)[None, :]            # i + 1
    ranks = pos1 + ahead                                                  # 1-based ranks of matches
    live = pos1 <= n_match[:, None]
    prec = torch.where(live, pos1.double() / ranks.double(), torch.zeros((), dtype=torch.float64))
    ap = prec.sum(1) / n_match.clamp(min=1).double()
    last_rank = torch.gather(ranks, 1, (n_match - 1).clamp(min=0)[:, None])[:, 0]
    inp = n_match.double() / last_rank.double()
    return has_match, ranks[:, 0], ap, inp


def _collect(chunks: Iterator[tuple[torch.Tensor, ...]]) -> dict[str, np.ndarray]:
    """Per-query figures of the queries that have a correct match, in query order."""
    first_ranks, aps, inps = [], [], []
    for has_match, first, ap, inp in chunks:
        first_ranks.append(first[has_match])
        aps.append(ap[has_match])
        inps.append(inp[has_match])
    if not first_ranks:
        return {"first_rank": np.zeros(0, np.int64), "ap": np.zeros(0), "inp": np.zeros(0)}
    return {"first_rank": torch.cat(first_ranks).numpy(), "ap": torch.cat(aps).numpy(),
            "inp": torch.cat(inps).numpy()}


def summarise(stats: dict[str, np.ndarray] | list[dict[str, np.ndarray]], max_rank: int = 50) -> dict:
    """The metrics dict from per-query figures (one dict, or a list of them, e.g. one per rank, each
    covering a disjoint share of the queries)."""
    _check_max_rank(max_rank)
    parts = stats if isinstance(stats, list) else [stats]
    first = np.concatenate([p["first_rank"] for p in parts]).astype(np.int64)
    n = int(first.size)
    if n == 0:
        raise ValueError("no query has a correct match in the gallery (after removing junk and "
                         "same-camera matches): check that query and gallery come from the same "
                         "split and that pids/camids are right")
    counts = np.bincount(np.minimum(first, max_rank + 1) - 1, minlength=max_rank + 1)[:max_rank]
    return {
        "rank1": float(np.mean(first <= 1)), "rank5": float(np.mean(first <= 5)),
        "rank10": float(np.mean(first <= 10)),
        "mAP": float(np.concatenate([p["ap"] for p in parts]).mean()),
        "mINP": float(np.concatenate([p["inp"] for p in parts]).mean()),
        "cmc": np.cumsum(counts) / n, "valid_queries": n,
    }


def _check_max_rank(max_rank: int) -> None:
    if not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"max_rank is {max_rank!r}; must be a positive integer")


def rank_metrics(distmat: ArrayLike, q_pids: ArrayLike, g_pids: ArrayLike, q_camids: ArrayLike,
                 g_camids: ArrayLike, max_rank: int = 50, chunk_size: int | None = None) -> dict:
    """CMC / mAP / mINP of a q x g distance matrix (numpy or torch, any float dtype).

    Returns {'rank1', 'rank5', 'rank10', 'mAP', 'mINP' (fractions in [0, 1]), 'cmc' (numpy array
    of length max_rank: cmc[k] = fraction of valid queries whose first match is within rank k+1),
    'valid_queries'}. Queries are processed `chunk_size` at a time (default: about 4M cells each).
    """
    _check_max_rank(max_rank)
    dist = as_tensor(distmat, "distmat")
    if dist.dim() != 2:
        raise ValueError(f"distmat must be 2-D [num_query, num_gallery], got shape {tuple(dist.shape)}")
    if not dist.dtype.is_floating_point:
        dist = dist.double()
    n_q, n_g = dist.shape
    qp = _labels(q_pids, "q_pids", n_q, "distmat rows")
    gp = _labels(g_pids, "g_pids", n_g, "distmat columns")
    qc = _labels(q_camids, "q_camids", n_q, "distmat rows")
    gc = _labels(g_camids, "g_camids", n_g, "distmat columns")
    step = _auto_chunk(chunk_size, n_g)
    g_keep = gp != -1

    def chunks() -> Iterator[tuple[torch.Tensor, ...]]:
        for s in range(0, n_q, step):
            d = dist[s:s + step]
            _check_finite(d, f"distmat rows {s}..{s + d.shape[0] - 1}")
            yield _chunk_stats(d, qp[s:s + step], qc[s:s + step], gp, gc, g_keep)

    return summarise(_collect(chunks()), max_rank)


def query_stats_from_features(qf: ArrayLike | None, gf: ArrayLike | None, q_pids: ArrayLike,
                              g_pids: ArrayLike, q_camids: ArrayLike, g_camids: ArrayLike,
                              metric: str = "euclidean", chunk_size: int | None = None,
                              local: tuple | None = None, distance: str = "global"
                              ) -> dict[str, np.ndarray]:
    """Per-query figures ('first_rank', 'ap', 'inp' of the queries with a correct match) for
    :func:`summarise`. Queries are independent, so ranks can each take a share of them."""
    if metric not in METRICS:
        raise ValueError(f"metric is {metric!r}; must be one of {list(METRICS)}")
    qf, gf, q_local, g_local = check_features(qf, gf, local, distance)
    n_q = (qf if qf is not None else q_local).shape[0]
    n_g = (gf if gf is not None else g_local).shape[0]
    qp = _labels(q_pids, "q_pids", n_q, "query features")
    gp = _labels(g_pids, "g_pids", n_g, "gallery features")
    qc = _labels(q_camids, "q_camids", n_q, "query features")
    gc = _labels(g_camids, "g_camids", n_g, "gallery features")
    # At least FEATURE_CHUNK queries at a time: thinner distance products run the GEMM far below speed.
    step = chunk_size if chunk_size is not None else max(FEATURE_CHUNK, CHUNK_CELLS // max(1, n_g))
    step = _auto_chunk(step, n_g)
    g_keep = gp != -1

    to_gallery = DistanceTo(gf, metric, g_local, distance)

    def chunks() -> Iterator[tuple[torch.Tensor, ...]]:
        for s in range(0, n_q, step):
            sl = slice(s, s + step)
            d = to_gallery(qf[sl] if qf is not None else None,
                           q_local[sl] if q_local is not None else None)
            yield _chunk_stats(d, qp[sl], qc[sl], gp, gc, g_keep)

    return _collect(chunks())


def rank_metrics_from_features(qf: ArrayLike | None, gf: ArrayLike | None, q_pids: ArrayLike,
                               g_pids: ArrayLike, q_camids: ArrayLike, g_camids: ArrayLike,
                               metric: str = "euclidean", max_rank: int = 50,
                               chunk_size: int | None = None, local: tuple | None = None,
                               distance: str = "global") -> dict:
    """Like :func:`rank_metrics`, but from features: each chunk of queries gets its distances to the
    gallery computed, scored and dropped, so memory is O(chunk x G) and the q x g matrix never exists.

    metric: 'euclidean' or 'cosine' (global features). distance: 'global', 'local' (aligned local
    distance of `local=(q_local [Q, S, C], g_local [G, S, C])`) or 'global+local' (their sum).
    qf/gf may be None when distance='local'.
    """
    _check_max_rank(max_rank)
    return summarise(query_stats_from_features(qf, gf, q_pids, g_pids, q_camids, g_camids, metric,
                                               chunk_size, local, distance), max_rank)
