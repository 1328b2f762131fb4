"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) in O((Q+G)·k) working memory.

The classic implementation builds the (Q+G)² distance matrix, a (Q+G)² argsort and two dense (Q+G)²
weight matrices, which is ~5·(Q+G)²·4 bytes (tens of GB on MSMT17). Everything the algorithm needs is
local, though:

1. each item's k1+1 nearest neighbours (over queries and gallery together) — one streaming pass over
   the rows of the distance matrix, keeping [N, k1+1] indices;
2. k-reciprocal sets and their expansion with the half-size (round(k1/2)) reciprocal sets of the
   candidates — index arithmetic on those neighbour lists;
3. the Gaussian-weighted sparse vectors V (at most (k1+1)·(round(k1/2)+2) entries per row), smoothed by
   query expansion over the k2 nearest neighbours — a sparse product;
4. the Jaccard distance of each query to every gallery item, through the inverted index of V (only
   items sharing a non-zero dimension contribute) — accumulated per chunk of queries.

The result matches the original algorithm: squared distances, each row divided by its maximum; the
neighbour order is (normalised distance, index), i.e. a stable argsort; final = (1-λ)·Jaccard + λ·that
normalised distance. The output itself, Q x G, is the only quadratic allocation.
:func:`rerank` takes the three distance matrices (as the original does) and reads them chunk by chunk;
:func:`rerank_from_features` computes the distances on the fly, so no (Q+G)² matrix ever exists.
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp
import torch
from tqdm import tqdm

from pipeline.evaluation.metrics import (CHUNK_CELLS, METRICS, DistanceTo, _check_finite, as_tensor,
                                         check_features)

# Bound on the (query, shared dimension, gallery item) contributions handled at once in step 4.
JACCARD_BUDGET = 1 << 21


class _Source(Protocol):
    """Distances over the N = Q + G items, queries first. Row i is column i of the classic
    concatenated matrix [[q_q, q_g], [q_g.T, g_g]] (the classic code normalises columns and then
    transposes), which is row i whenever that matrix is symmetric."""

    num_query: int
    size: int

    def rows(self, start: int, stop: int) -> torch.Tensor: ...

    def pairs(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor: ...


class _DenseSource:
    def __init__(self, q_g: torch.Tensor, q_q: torch.Tensor, g_g: torch.Tensor):
        self.q_g, self.q_q, self.g_g = q_g, q_q, g_g
        self.num_query = q_g.shape[0]
        self.size = q_g.shape[0] + q_g.shape[1]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        nq, parts = self.num_query, []
        if start < nq:
            b = min(stop, nq)
            parts.append(torch.cat([self.q_q[:, start:b].t(), self.q_g[start:b]], 1))
        if stop > nq:
            a, b = max(start, nq) - nq, stop - nq
            parts.append(torch.cat([self.q_g[:, a:b].t(), self.g_g[:, a:b].t()], 1))
        return torch.cat(parts, 0).float()

    def pairs(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        nq = self.num_query
        r = rows[:, None].expand_as(cols)
        out = torch.empty(cols.shape, dtype=self.q_g.dtype)
        rq, cq = r < nq, cols < nq
        for sel, block, i, j in ((rq & cq, self.q_q, cols, r), (rq & ~cq, self.q_g, r, cols - nq),
                                 (~rq & cq, self.q_g, cols, r - nq),
                                 (~rq & ~cq, self.g_g, cols - nq, r - nq)):
            out[sel] = block[i[sel], j[sel]]
        return out.float()


class _FeatureSource:
    def __init__(self, feats: torch.Tensor | None, local: torch.Tensor | None, num_query: int,
                 metric: str, distance: str):
        self.feats, self.local = feats, local
        self.to_all = DistanceTo(feats, metric, local, distance)
        self.num_query = num_query
        self.size = (feats if feats is not None else local).shape[0]

    def _block(self, rows: torch.Tensor | slice, cols: torch.Tensor | None) -> torch.Tensor:
        return self.to_all(self.feats[rows] if self.feats is not None else None,
                           self.local[rows] if self.local is not None else None, cols).float()

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self._block(slice(start, stop), None)

    def pairs(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        # One dense block against the distinct columns (a GEMM, at worst the cost of full rows)
        # rather than one small product per pair, which is memory-bound and far slower.
        out = torch.empty(cols.shape, dtype=torch.float32)
        step = max(1, CHUNK_CELLS // self.size)
        for s in range(0, rows.shape[0], step):
            distinct, where = torch.unique(cols[s:s + step], return_inverse=True)
            out[s:s + step] = torch.gather(self._block(rows[s:s + step], distinct), 1, where)
        return out


def _stable_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k smallest entries of each row, in (value, index) order — what a stable argsort
    gives, whatever ties there are (topk alone picks arbitrarily among ties)."""
    c = values.shape[0]
    kth = torch.topk(values, k, dim=1, largest=False, sorted=True).values[:, -1:]
    less = values < kth
    take = values == kth
    need = k - less.sum(1, keepdim=True)
    surplus = (take.sum(1, keepdim=True) > need)[:, 0]
    if bool(surplus.any()):  # more ties at the k-th value than places: keep the lowest indices
        take[surplus] &= torch.cumsum(take[surplus], 1) <= need[surplus]
    take |= less
    idx = take.nonzero(as_tuple=True)[1].view(c, k)            # ascending index within each row
    order = torch.sort(torch.gather(values, 1, idx), dim=1, stable=True).indices
    return torch.gather(idx, 1, order)


def _reciprocal(knn: torch.Tensor, width: int, chunk: int) -> torch.Tensor:
    """mask[i, j]: item i is among the first `width` neighbours of its j-th neighbour (j < width)."""
    n = knn.shape[0]
    out = torch.empty((n, width), dtype=torch.bool)
    for s in range(0, n, chunk):
        fwd = knn[s:s + chunk, :width]
        back = knn[fwd][:, :, :width]
        out[s:s + chunk] = (back == torch.arange(s, s + fwd.shape[0])[:, None, None]).any(-1)
    return out


def _check_params(k1: int, k2: int, lambda_value: float) -> None:
    if not isinstance(k1, int) or k1 < 1:
        raise ValueError(f"k1 is {k1!r}; must be an integer >= 1 (the paper uses 20)")
    if not isinstance(k2, int) or not 1 <= k2 <= k1 + 1:
        raise ValueError(f"k2 is {k2!r}; must be an integer in [1, k1+1] = [1, {k1 + 1}] "
                         f"(the paper uses 6)")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value is {lambda_value!r}; must be in [0, 1] (the paper uses 0.3)")


def _rerank(src: _Source, k1: int, k2: int, lambda_value: float, chunk_size: int | None,
            progress: bool) -> torch.Tensor:
    n, nq = src.size, src.num_query
    ng = n - nq
    if nq == 0 or ng == 0:
        raise ValueError(f"re-ranking needs queries and gallery items (got {nq} and {ng})")
    step = chunk_size or max(1, CHUNK_CELLS // n)
    k_full = min(k1 + 1, n)
    k_half = min(int(np.around(k1 / 2.0)) + 1, k_full)

    # 1. Neighbour lists, row maxima; the normalised q x g block goes straight into the output.
    out = torch.empty((nq, ng), dtype=torch.float32)
    knn = torch.empty((n, k_full), dtype=torch.int64)
    row_max = torch.empty(n, dtype=torch.float32)
    bar = tqdm(total=n, desc="re-rank: neighbours", unit="row", disable=not progress, leave=False)
    for s in range(0, n, step):
        e = min(s + step, n)
        sq = src.rows(s, e).pow_(2)
        _check_finite(sq, f"distances of items {s}..{e - 1}")
        row_max[s:e] = sq.max(1).values
        if bool((row_max[s:e] <= 0).any()):
            raise ValueError(f"items {s}..{e - 1}: some item is at distance 0 from every item; "
                             f"re-ranking needs distinct features")
        sq /= row_max[s:e, None]
        knn[s:e] = _stable_smallest(sq, k_full)
        if s < nq:
            out[s:min(e, nq)] = sq[:min(e, nq) - s, nq:]
        bar.update(e - s)
    bar.close()

    # 2. k-reciprocal sets, expanded with the candidates' half-size reciprocal sets when those
    # overlap the set by more than 2/3 (compared in integers: 3·overlap > 2·size).
    recip = _reciprocal(knn, k_full, 4096)
    half = knn[:, :k_half]
    half_recip = _reciprocal(knn, k_half, 4096)
    rows_v, cols_v, vals_v = [], [], []
    jstep = 2048
    for s in range(0, n, jstep):
        e = min(s + jstep, n)
        c = e - s
        rset = torch.where(recip[s:e], knn[s:e], -1)                       # [c, K]
        cand_half = half[knn[s:e]]                                         # [c, K, Kh]
        cand_mask = half_recip[knn[s:e]] & recip[s:e, :, None]
        overlap = ((cand_half[..., None] == rset[:, None, None, :]).any(-1) & cand_mask).sum(-1)
        accept = 3 * overlap > 2 * cand_mask.sum(-1)
        extra = torch.where(accept[:, :, None] & cand_mask, cand_half, -1).view(c, -1)
        members = torch.sort(torch.cat([rset, extra], 1), dim=1).values
        members[:, 1:][members[:, 1:] == members[:, :-1]] = -1              # drop duplicates
        valid = members >= 0
        rows = torch.arange(s, e)
        dist = src.pairs(rows, members.clamp(min=0)).pow_(2) / row_max[s:e, None]
        weight = torch.where(valid, torch.exp(-dist), torch.zeros(()))
        weight /= weight.sum(1, keepdim=True)
        r_idx, slot = valid.nonzero(as_tuple=True)
        rows_v.append((r_idx + s).numpy())
        cols_v.append(members[r_idx, slot].numpy())
        vals_v.append(weight[r_idx, slot].numpy())
    v = sp.csr_matrix((np.concatenate(vals_v), (np.concatenate(rows_v), np.concatenate(cols_v))),
                      shape=(n, n), dtype=np.float32)
    del rows_v, cols_v, vals_v

    # 3. Local query expansion: each row becomes the mean of its k2 nearest neighbours' rows.
    if k2 != 1:
        nn_k2 = knn[:, :k2].numpy()
        expand = sp.csr_matrix((np.ones(nn_k2.size, dtype=np.float32),
                                (np.repeat(np.arange(n), k2), nn_k2.ravel())), shape=(n, n))
        v = expand @ v
        v.data /= np.float32(k2)
    del knn, recip, half_recip

    # 4. Jaccard distance of queries to gallery items through the inverted index: for query i and
    # gallery j, sum over shared dimensions k of min(V[i, k], V[j, k]).
    vq = v[:nq].tocsr()
    vg = v[nq:].tocsc()
    col_nnz = np.diff(vg.indptr)
    q_rows = np.repeat(np.arange(nq), np.diff(vq.indptr))
    work = np.bincount(q_rows, weights=col_nnz[vq.indices], minlength=nq)
    row_cap = max(1, CHUNK_CELLS // ng)
    bar = tqdm(total=nq, desc="re-rank: jaccard", unit="query", disable=not progress, leave=False)
    s = 0
    while s < nq:
        e = s + 1
        budget = work[s]
        while e < nq and e - s < row_cap and budget + work[e] <= JACCARD_BUDGET:
            budget += work[e]
            e += 1
        lo, hi = vq.indptr[s], vq.indptr[e]
        dims, a = vq.indices[lo:hi], vq.data[lo:hi]
        owner = q_rows[lo:hi] - s
        starts, lengths = vg.indptr[dims], col_nnz[dims]
        offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        pos = np.repeat(starts, lengths) + offsets
        shared = np.bincount(np.repeat(owner, lengths) * ng + vg.indices[pos],
                             weights=np.minimum(np.repeat(a, lengths), vg.data[pos]),
                             minlength=(e - s) * ng)
        shared = torch.from_numpy(shared.astype(np.float32).reshape(e - s, ng))
        jaccard = 1.0 - shared / (2.0 - shared)
        out[s:e] = jaccard * (1.0 - lambda_value) + out[s:e] * lambda_value
        bar.update(e - s)
        s = e
    bar.close()
    return out


def _like(result: torch.Tensor, reference: Any) -> Any:
    return result if isinstance(reference, torch.Tensor) else result.numpy()


def rerank(q_g: Any, q_q: Any, g_g: Any, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
           chunk_size: int | None = None, progress: bool = False) -> Any:
    """Re-ranked q x g distances (float32; numpy if `q_g` is numpy, else a tensor) from the
    query-gallery, query-query and gallery-gallery distance matrices (raw distances, not squared).

    The inputs are read `chunk_size` rows at a time; beyond them and the output, memory is
    O((Q+G)·k1·k2).
    """
    _check_params(k1, k2, lambda_value)
    qg, qq, gg = (as_tensor(x, name) for x, name in ((q_g, "q_g"), (q_q, "q_q"), (g_g, "g_g")))
    nq, ng = qg.shape if qg.dim() == 2 else (-1, -1)
    if qg.dim() != 2 or tuple(qq.shape) != (nq, nq) or tuple(gg.shape) != (ng, ng):
        raise ValueError(f"expected q_g [Q, G], q_q [Q, Q], g_g [G, G]; got {tuple(qg.shape)}, "
                         f"{tuple(qq.shape)}, {tuple(gg.shape)}")
    dtype = torch.promote_types(torch.promote_types(qg.dtype, qq.dtype), gg.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float32
    src = _DenseSource(qg.to(dtype), qq.to(dtype), gg.to(dtype))
    return _like(_rerank(src, k1, k2, lambda_value, chunk_size, progress), q_g)


def rerank_from_features(qf: Any, gf: Any, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                         metric: str = "euclidean", local: tuple | None = None,
                         distance: str = "global", chunk_size: int | None = None,
                         progress: bool = False) -> Any:
    """Re-ranked q x g distances straight from features: equal to ``rerank`` of the matrices that
    ``feature_distance`` would give (metric / distance / local as in rank_metrics_from_features), but
    the distances are computed a chunk of rows at a time and no (Q+G)² matrix is ever built.
    Returns numpy if `qf` (or the query local features when distance='local') is numpy."""
    _check_params(k1, k2, lambda_value)
    if metric not in METRICS:
        raise ValueError(f"metric is {metric!r}; must be one of {list(METRICS)}")
    qt, gt, q_local, g_local = check_features(qf, gf, local, distance)
    feats = torch.cat([qt, gt]) if qt is not None else None
    loc = torch.cat([q_local, g_local]) if q_local is not None else None
    nq = (qt if qt is not None else q_local).shape[0]
    src = _FeatureSource(feats, loc, nq, metric, distance)
    reference = qf if qt is not None else local[0]
    return _like(_rerank(src, k1, k2, lambda_value, chunk_size, progress), reference)
