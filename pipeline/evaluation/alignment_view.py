"""The alignment picture of an evaluation (`alignment.png`): for a few queries, the query between its
nearest true match and its nearest negative, their stripes, and the stripe pairs the aligned local
distance matches (the shortest path through the S x S element-distance grid), as in AlignedReID's
figure of typical alignments.

It needs only a few images, so it reads and runs only those: the query split's first shard and as many
gallery shards, in order, as it takes to find a true match (same identity, another camera) for the
chosen queries and a pool of negatives, then one forward pass of the chosen images. The evaluation's
own feature matrices are not needed. Rank 0 draws it after the collective evaluation; nothing here
talks to other ranks.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from pipeline.alignment import element_distance, shortest_path_cells
from pipeline.checkpoint import evaluated_network
from pipeline.data import transforms
from pipeline.data.evalset import locate
from pipeline.data.images import decode_rgb, resize_batch
from pipeline.data.locations import as_source
from pipeline.data.shards import load_manifest, read_samples, split_layout

log = logging.getLogger(__name__)

ALIGNMENT_QUERIES = 4       # rows of the picture
NEGATIVE_POOL = 64          # gallery images of other identities searched for each query's hard negative
BATCH = 64


def _split_meta(source, split: str, shards: range | None = None):
    """(index, pid, camid) of every sample of the given shards of `split`, shard by shard."""
    layout = split_layout(load_manifest(source), split)
    for number in shards if shards is not None else range(len(layout)):
        entry, first = layout[number]
        found = read_samples(source, split, entry, first, list(range(entry["samples"])), False)
        yield [(first + pos, int(s.meta["pid"]), int(s.meta["camid"])) for pos, s in sorted(found.items())]


def _read(source, split: str, indices: list[int]) -> dict[int, bytes]:
    layout = split_layout(load_manifest(source), split)
    out = {}
    for shard, positions in locate(layout, indices).items():
        entry, first = layout[shard]
        for pos, sample in read_samples(source, split, entry, first, positions, False).items():
            out[first + pos] = sample.image
    return out


def choose_images(source, queries: int = ALIGNMENT_QUERIES, pool: int = NEGATIVE_POOL) -> list[dict]:
    """Up to `queries` queries, evenly spread over those of the first query shard that have a true match
    (same identity, another camera) in the gallery shards read so far, each with its true matches and a
    pool of up to `pool` negatives (other identities; junk, pid -1, excluded everywhere):
    [{'query': (index, pid, camid), 'matches': [gallery index, ...], 'negatives': [...]}].
    Gallery shards are read in order until enough queries have a match and the pool is full.
    Deterministic."""
    (candidates,) = list(_split_meta(source, "query", range(1)))
    candidates = [c for c in candidates if c[1] != -1]
    gallery: list[tuple[int, int, int]] = []
    cameras: dict[int, set[int]] = {}
    matched: list[tuple[int, int, int]] = []
    for shard in _split_meta(source, "gallery"):
        for g in shard:
            if g[1] != -1:
                gallery.append(g)
                cameras.setdefault(g[1], set()).add(g[2])
        matched = [q for q in candidates if cameras.get(q[1], set()) - {q[2]}]
        if len(matched) >= queries and len(gallery) >= pool + 2 * queries:
            break
    if not matched:
        return []
    picks = np.unique(np.linspace(0, len(matched) - 1, min(queries, len(matched))).round().astype(int))
    chosen = []
    for q in (matched[i] for i in picks):
        matches = [g[0] for g in gallery if g[1] == q[1] and g[2] != q[2]]
        others = [g[0] for g in gallery if g[1] != q[1]]
        spread = np.unique(np.linspace(0, len(others) - 1, min(pool, len(others))).round().astype(int))
        chosen.append({"query": q, "matches": matches, "negatives": [others[i] for i in spread] if others else []})
    return chosen


@torch.no_grad()
def _features(net: nn.Module, images: list[bytes], image_size: tuple[int, int], device: torch.device,
              normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Global (L2-normalised, as evaluation compares them) and stripe features [N, S, C] (L2-normalised
    per stripe when `normalize`) of encoded images, preprocessed as evaluation does."""
    glob, local = [], []
    for lo in range(0, len(images), BATCH):
        pixels = [decode_rgb(data, image_size) for data in images[lo:lo + BATCH]]
        x = transforms.normalize(resize_batch(pixels, image_size)).to(device)
        g, s = net(x, return_local=True)
        glob.append(g.float().cpu())
        local.append(s.float().cpu())
    glob_t, local_t = torch.cat(glob), torch.cat(local)
    if normalize:
        local_t = torch.nn.functional.normalize(local_t, dim=2)
    return torch.nn.functional.normalize(glob_t, dim=1), local_t


def _pair(q_local: torch.Tensor, g_local: torch.Tensor) -> tuple[np.ndarray, list[tuple[int, int]], float]:
    grid = element_distance((q_local[:, None, :] - g_local[None, :, :]).double().pow(2).sum(-1))
    cells = shortest_path_cells(grid)
    return grid.numpy(), cells, float(sum(grid[i, j] for i, j in cells))


def alignment_picture(model: nn.Module, shards, out_path: str | Path, **options) -> str | None:
    """write_alignment_picture for an evaluation that must go on without it (the trainer's, reid-evaluate's):
    a failure is logged as a warning and costs only the picture. Returns the file written, or None."""
    try:
        path = write_alignment_picture(model, shards, out_path, **options)
    except Exception as exc:  # noqa: BLE001 - the metrics are computed already; say why and go on
        log.warning("alignment picture not drawn (%s: %s)", type(exc).__name__, exc)
        return None
    return None if path is None else str(path)


def write_alignment_picture(model: nn.Module, shards, out_path: str | Path, *,
                            image_size: tuple[int, int] | list[int], device: torch.device | str = "cpu",
                            normalize: bool | None = None, distance: str = "global",
                            queries: int = ALIGNMENT_QUERIES) -> Path | None:
    """Draw `alignment.png` (pipeline.evaluation.visualize.plot_alignments) for a few queries of the
    evaluated shard set `shards`: per query, its nearest true match and its nearest negative among
    NEGATIVE_POOL gallery images under `distance` (global | local | global+local, the evaluation's),
    with the stripe pairs on the aligned path. `normalize`: L2-normalise each stripe before the
    element distance (default: the network's own `local_normalize`, i.e. its model.local_normalize).
    Returns None, writing nothing, when the network has no local branch or no query has a true match.
    Runs on one process; the network's train/eval mode is restored."""
    from pipeline.evaluation.visualize import plot_alignments

    net = evaluated_network(model)
    if not hasattr(net, "local_features"):
        return None
    if normalize is None:
        normalize = bool(getattr(net, "local_normalize", False))
    source = as_source(shards)
    chosen = choose_images(source, queries)
    if not chosen:
        log.warning("alignment picture: no query of the first query shard has a true match in the gallery")
        return None
    image_size = (int(image_size[0]), int(image_size[1]))
    q_bytes = _read(source, "query", [c["query"][0] for c in chosen])
    wanted = sorted({i for c in chosen for i in c["matches"] + c["negatives"]})
    g_bytes = _read(source, "gallery", wanted)
    order_q = [c["query"][0] for c in chosen]
    was_training = net.training
    net.eval()
    try:
        qg, ql = _features(net, [q_bytes[i] for i in order_q], image_size, torch.device(device), normalize)
        gg, gl = _features(net, [g_bytes[i] for i in wanted], image_size, torch.device(device), normalize)
    finally:
        net.train(was_training)
    row_of = {index: k for k, index in enumerate(wanted)}

    def nearest(k: int, indices: list[int]) -> tuple[int, float, float]:
        """The gallery image of `indices` nearest to query k under `distance`, with its global and
        aligned local distances."""
        scored = []
        for index in indices:
            d_global = float((qg[k] - gg[row_of[index]]).norm())
            d_local = _pair(ql[k], gl[row_of[index]])[2]
            total = {"global": d_global, "local": d_local}.get(distance, d_global + d_local)
            scored.append((total, index, d_global, d_local))
        _, index, d_global, d_local = min(scored)
        return index, d_global, d_local

    rows = []
    for k, c in enumerate(chosen):
        q_index, q_pid, _ = c["query"]
        pairs = []
        for kind, indices, correct in (("true match", c["matches"], True),
                                       ("nearest negative", c["negatives"], False)):
            if not indices:
                continue
            index, d_global, d_local = nearest(k, indices)
            grid, cells, _ = _pair(ql[k], gl[row_of[index]])
            pairs.append({"image": Image.open(io.BytesIO(g_bytes[index])).convert("RGB"), "correct": correct,
                          "label": f"{kind} g{index}\nglobal {d_global:.3f}, aligned {d_local:.2f}",
                          "grid": grid, "cells": cells})
        rows.append({"query": Image.open(io.BytesIO(q_bytes[q_index])).convert("RGB"),
                     "query_label": f"query q{q_index}\npid {q_pid}", "pairs": pairs})
    stripes = f"{ql.shape[1]} stripes per image, {'L2-normalised' if normalize else 'not normalised'}"
    title = (f"Aligned stripes: each line joins a stripe pair on the shortest path ({stripes})\n"
             f"green: the query's nearest true match; red: its nearest negative among up to {NEGATIVE_POOL} "
             f"gallery images; by the {distance} distance")
    return plot_alignments(rows, out_path, tile_size=_display_size(image_size), title=title)


def _display_size(image_size: tuple[int, int]) -> tuple[int, int]:
    """Tiles 256 pixels high (or the image's own height when taller), aspect kept."""
    h, w = image_size
    scale = max(1.0, 256 / h)
    return int(round(h * scale)), int(round(w * scale))
