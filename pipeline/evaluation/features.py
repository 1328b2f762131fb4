"""Distributed feature extraction and the collective `evaluate` used by training and launch/evaluate.py.

Extraction: each rank reads its own contiguous share of a split (``eval_batches``), runs the model and
all-gathers the result. Shares differ in size by one when the split does not divide evenly and
all_gather needs equal shapes, so every rank pads to the largest share and sends its row count with
it; rows are then put back in place by the split index each sample carries. Every index must arrive
exactly once — a duplicate or a missing image is an error naming the split and the indices, never a
silently shifted feature matrix.

Metrics: queries are independent, so without re-ranking each rank scores its own share of the queries
against the whole gallery (the distance computation, the expensive part, is split across ranks) and
the per-query figures are gathered and summarised identically on every rank. Re-ranking needs the
whole neighbourhood graph, so rank 0 computes it and broadcasts the result (size engine.timeout_s for
it on large sets); an error on rank 0 is broadcast too, so the other ranks raise instead of waiting.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline import distributed as D
from pipeline.checkpoint import evaluated_network
from pipeline.data import eval_batches, load_manifest, read_images
from pipeline.fileio import atomic_write
from pipeline.evaluation.metrics import (USES_LOCAL, feature_distance, query_stats_from_features, rank_metrics,
                                         summarise)
from pipeline.evaluation.rerank import rerank_from_features

RANKED_QUERIES = 6   # queries shown in the ranked-list picture
RANKED_TOPK = 10


def _gather_rows(rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """all_gather of [n_rank, ...] tensors whose n_rank differs by rank -> concatenation in rank order."""
    if D.get_world_size() == 1:
        return rows
    counts = D.all_gather_object(int(rows.shape[0]))
    padded = torch.zeros((max(counts), *rows.shape[1:]), dtype=rows.dtype, device=device)
    padded[:rows.shape[0]] = rows.to(device)
    parts = D.all_gather_no_grad(padded).cpu().split(max(counts))
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


@torch.no_grad()
def extract_features(model: nn.Module, shards_dir: str | Path, split: str, *,
                     image_size: tuple[int, int] | list[int], device: torch.device | str = "cpu",
                     batch_size: int = 128, with_local: bool = False, num_workers: int = 0,
                     progress: bool = True) -> dict[str, torch.Tensor | None]:
    """Collective: features of the whole `split`, in split index order, on every rank (CPU tensors).

    Returns {'global': [N, D] float32, 'local': [N, S, C] float32 or None, 'pids', 'camids' (int64)}.
    The model is run as given (put it in eval mode first; :func:`evaluate` does)."""
    device = torch.device(device)
    rank, world = D.get_rank(), D.get_world_size()
    total = int(load_manifest(shards_dir)["splits"][split]["images"])
    batches = eval_batches(shards_dir, split, batch_size=batch_size, image_size=image_size,
                           rank=rank, world_size=world, num_workers=num_workers)
    feats, locs, meta = [], [], []
    for batch in tqdm(batches, desc=f"features: {split}", unit="batch", leave=False,
                      disable=not (progress and D.is_main())):
        images = batch["images"].to(device, non_blocking=True)
        if with_local:
            g, lo = model(images, return_local=True)
            locs.append(lo.float().cpu())
        else:
            g = model(images)
        feats.append(g.float().cpu())
        meta.append(torch.stack([batch["index"], batch["pids"], batch["camids"]], 1))
    # Ranks with an empty share still take part in the gathers (with zero rows of the right width).
    shape = D.all_gather_object(tuple(feats[0].shape[1:]) if feats else None)
    dim = next((s for s in shape if s is not None), None)
    if dim is None:
        raise ValueError(f"{shards_dir}: split '{split}' has no images to extract features from")
    g_rows = torch.cat(feats) if feats else torch.zeros((0, *dim))
    m_rows = torch.cat(meta) if meta else torch.zeros((0, 3), dtype=torch.int64)
    gathered = _gather_rows(g_rows, device)
    meta_all = _gather_rows(m_rows, device)
    local_all = None
    if with_local:
        l_shape = D.all_gather_object(tuple(locs[0].shape[1:]) if locs else None)
        l_dim = next(s for s in l_shape if s is not None)
        local_all = _gather_rows(torch.cat(locs) if locs else torch.zeros((0, *l_dim)), device)

    index = meta_all[:, 0]
    seen = torch.bincount(index.clamp(0, total), minlength=total + 1)
    out_of_range = index[(index < 0) | (index >= total)]
    duplicated = torch.nonzero(seen[:total] > 1)[:, 0]
    missing = torch.nonzero(seen[:total] == 0)[:, 0]
    if out_of_range.numel() or duplicated.numel() or missing.numel():
        raise RuntimeError(
            f"{shards_dir}: features of split '{split}' gathered from {world} rank(s) do not cover "
            f"indices 0..{total - 1} exactly once: duplicated {duplicated[:10].tolist()}, missing "
            f"{missing[:10].tolist()}, out of range {out_of_range[:10].tolist()}. The manifest and "
            f"the shards disagree; re-run launch/prepare_data.py")
    order = torch.argsort(index)
    return {"global": gathered[order], "local": local_all[order] if local_all is not None else None,
            "pids": meta_all[order, 1], "camids": meta_all[order, 2]}


def _pictures(shards_dir: str | Path, result: dict, q: dict, g: dict, dist_rows: torch.Tensor,
              chosen: np.ndarray, out_dir: Path, tag: str) -> list[str]:
    # Imported here: only the rank that draws pays for matplotlib.
    from pipeline.evaluation.visualize import plot_cmc, plot_ranked_lists, ranked_lists

    cmc_path = plot_cmc(result["cmc"], out_dir / "cmc.png",
                        title=f"CMC ({tag}): R1 {100 * result['rank1']:.1f}  "
                              f"mAP {100 * result['mAP']:.1f}")
    entries = ranked_lists(dist_rows, q["pids"][chosen].tolist(), q["camids"][chosen].tolist(),
                           g["pids"].numpy(), g["camids"].numpy(), topk=RANKED_TOPK)
    query_images = read_images(shards_dir, "query", chosen.tolist())
    gallery_images = [read_images(shards_dir, "gallery", e["gallery"]) for e in entries]
    labels = [f"q{i} pid {int(q['pids'][i])}" for i in chosen]
    lists_path = plot_ranked_lists(entries, query_images, gallery_images, out_dir / "ranked_lists.png",
                                   query_labels=labels)
    return [str(cmc_path), str(lists_path)]


def _choose_queries(q: dict, g: dict) -> np.ndarray:
    """Evenly spread queries that have at least one correct match (deterministic)."""
    q_p, q_c = q["pids"].numpy(), q["camids"].numpy()
    g_p, g_c = g["pids"].numpy(), g["camids"].numpy()
    ok = [i for i in range(len(q_p)) if np.any((g_p == q_p[i]) & (g_c != q_c[i]))]
    if not ok:
        return np.zeros(0, dtype=np.int64)
    picks = np.linspace(0, len(ok) - 1, min(RANKED_QUERIES, len(ok))).round().astype(int)
    return np.array(ok, dtype=np.int64)[np.unique(picks)]


def evaluate(model: nn.Module, shards_dir: str | Path, *, image_size: tuple[int, int] | list[int],
             device: torch.device | str = "cpu", distance: str = "global", rerank: bool = False,
             batch_size: int = 128, max_rank: int = 50, output_dir: str | Path | None = None,
             plots: bool = True, metric: str = "euclidean", num_workers: int = 0,
             progress: bool = True) -> dict[str, Any]:
    """Collective (every rank calls it; every rank gets the same dict): rank-1/5/10, mAP, mINP, cmc,
    valid_queries of the query split against the gallery split, and `artifacts` (paths written).

    distance: 'global' | 'local' | 'global+local' | 'global+local-sum'. Global features are
    L2-normalised and, with the default metric, compared by Euclidean distance. Stripe features are
    used as the model returns them: L2-normalised per stripe exactly when it was trained so
    (`model.local_normalize`), as test time must equal training time. 'global+local' puts the two
    distances on a common scale (pipeline.evaluation.metrics.combine_scaled); '-sum' adds them plainly
    (the reproductions). rerank: k-reciprocal
    re-ranking (k1=20, k2=6, λ=0.3). With `output_dir` (on rank 0) the CMC curve, ranked lists and
    metrics.json are written there (pictures when `plots`). The model is put in eval mode and its
    previous mode restored."""
    net = evaluated_network(model)
    was_training = net.training
    net.eval()
    try:
        with_local = distance in USES_LOCAL
        kwargs = dict(image_size=image_size, device=device, batch_size=batch_size,
                      with_local=with_local, num_workers=num_workers, progress=progress)
        q = extract_features(net, shards_dir, "query", **kwargs)
        g = extract_features(net, shards_dir, "gallery", **kwargs)
    finally:
        net.train(was_training)
    for part in (q, g):   # stripes stay as the model gives them: unit length exactly when it was trained so
        part["global"] = torch.nn.functional.normalize(part["global"], dim=1)
    use_global = distance != "local"
    qf, gf = (q["global"], g["global"]) if use_global else (None, None)
    local = (q["local"], g["local"]) if with_local else None
    labels = (q["pids"], g["pids"], q["camids"], g["camids"])
    is_main = D.is_main()

    reranked = None
    if rerank:
        # Rank 0 re-ranks and broadcasts the metrics (or its error) so no rank is left waiting.
        outcome: tuple[str, Any] = ("ok", None)
        if is_main:
            try:
                reranked = rerank_from_features(qf, gf, metric=metric, local=local, distance=distance,
                                                progress=progress)
                outcome = ("ok", rank_metrics(reranked, *labels, max_rank=max_rank))
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                outcome = ("error", f"{type(exc).__name__}: {exc}")
        status, payload = D.broadcast_object(outcome)
        if status == "error":
            raise RuntimeError(f"re-ranked evaluation failed on rank 0: {payload}")
        result = payload
    else:
        lo, hi = (len(q["pids"]) * r // D.get_world_size() for r in (D.get_rank(), D.get_rank() + 1))
        share = slice(lo, hi)
        stats = query_stats_from_features(
            qf[share] if qf is not None else None, gf, labels[0][share], labels[1],
            labels[2][share], labels[3], metric=metric, distance=distance,
            local=(local[0][share], local[1]) if local is not None else None)
        result = summarise(D.all_gather_object(stats), max_rank)

    artifacts: list[str] = []
    if is_main and output_dir is not None:
        out_dir = Path(output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tag = distance + (", re-ranked" if rerank else "")
        try:
            if plots:
                chosen = _choose_queries(q, g)
                if chosen.size:
                    rows = reranked[chosen] if reranked is not None else feature_distance(
                        qf[chosen] if qf is not None else None, gf, metric=metric,
                        x_local=local[0][chosen] if local is not None else None,
                        y_local=local[1] if local is not None else None, distance=distance)
                    artifacts += _pictures(shards_dir, result, q, g, torch.as_tensor(rows), chosen,
                                           out_dir, tag)
            metrics_path = out_dir / "metrics.json"
            atomic_write(metrics_path, json.dumps({**{k: v for k, v in result.items() if k != "cmc"},
                                                   "cmc": [float(x) for x in result["cmc"]],
                                                   "distance": distance, "rerank": rerank}, indent=1) + "\n")
            artifacts.append(str(metrics_path))
        except OSError as exc:
            # A full disk must not take the metrics (or a training run) down with it.
            tqdm.write(f"evaluation: could not write pictures/metrics to {out_dir}: {exc}")
    result["artifacts"] = D.broadcast_object(artifacts)
    return result
