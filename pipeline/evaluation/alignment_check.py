"""Does the shortest path align body parts? Measured on synthetic pairs whose geometry is known.

The synthetic generator (pipeline/data/synthetic.py) knows where each person stands in a crop: the top
of the head and the person's height, in pixels. For a same-person pair (two cameras, two poses, both
crops misaligned as in the training data) the stripe of crop B that shows the same body part as stripe
i of crop A follows from that geometry: stripe i's centre row y is at body height u = (y - top_a) /
height_a, which crop B shows at row top_b + u * height_b. Stripes that show no body in A (above the
head, below the feet) or whose part B does not show are left out.

`alignment_accuracy` runs the model on such pairs and reports, over every cell (i, j) of the
shortest path through the element-distance grid, how often j is the true partner of i within
`tolerance` stripes. Two references come with it: the plain diagonal (stripe i against stripe i, what
a method without alignment compares) and, in the ablation, an untrained network of the same shape.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.alignment import element_distance, shortest_path_cells
from pipeline.data import synthetic
from pipeline.data.transforms import normalize


def synthetic_pairs(count: int, image_size: tuple[int, int], misalign: float = 1.0, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`count` same-person pairs, each person seen by two different cameras:
    (images_a, images_b) uint8 [count, H, W, 3] and (place_a, place_b) float [count, 2] = (top, height)
    of the person in pixels. Deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    h, w = image_size
    images, places = [[], []], [[], []]
    while len(images[0]) < count:
        person = synthetic.random_person(rng)
        cams = [synthetic.random_camera(rng) for _ in range(2)]
        views = [synthetic.render_placed(person, cam, (h, w), rng, misalign) for cam in cams]
        for side, (image, top, height) in enumerate(views):
            images[side].append(image)
            places[side].append((top, height))
    return (np.stack(images[0]), np.stack(images[1]),
            np.asarray(places[0], np.float64), np.asarray(places[1], np.float64))


def true_partners(place_a: np.ndarray, place_b: np.ndarray, height: int, stripes: int) -> np.ndarray:
    """[P, S] int: the stripe of B showing the body part at stripe i's centre row in A; -1 where
    stripe i shows no body in A or B does not show that part."""
    rows = (np.arange(stripes) + 0.5) * height / stripes                       # stripe centres in A
    u = (rows[None, :] - place_a[:, :1]) / place_a[:, 1:]                      # body height, 0 = top
    y_b = place_b[:, :1] + u * place_b[:, 1:]
    partner = np.floor(y_b * stripes / height).astype(np.int64)
    ok = (u >= 0) & (u <= 1) & (partner >= 0) & (partner < stripes)
    return np.where(ok, partner, -1)


def _score(cells, partner: np.ndarray, tolerance: int) -> tuple[int, int]:
    judged = [(i, j) for i, j in cells if partner[i] >= 0]
    return sum(abs(j - int(partner[i])) <= tolerance for i, j in judged), len(judged)


@torch.no_grad()
def alignment_accuracy(model: nn.Module, image_size: tuple[int, int], *, pairs: int = 200,
                       misalign: float = 1.0, tolerance: int = 1, seed: int = 0,
                       device: torch.device | str = "cpu", batch_size: int = 64) -> dict[str, float]:
    """How often the shortest path matches a stripe to the stripe showing the same body part.

    Returns {'path': share of path cells on the true partner (within `tolerance` stripes),
    'diagonal': the same share for the diagonal i -> i, 'path_exact' / 'diagonal_exact': the same
    with no tolerance, 'cells': path cells judged, 'pairs', 'stripes': S, 'tolerance'}. The model is
    run in eval mode (`model(x, return_local=True)`), its mode restored."""
    images_a, images_b, place_a, place_b = synthetic_pairs(pairs, image_size, misalign, seed)
    was_training = model.training
    model.eval()
    try:
        stripes = []
        for images in (images_a, images_b):
            parts = []
            for start in range(0, len(images), batch_size):
                batch = torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2)
                parts.append(model(normalize(batch.to(device)), return_local=True)[1].float().cpu())
            stripes.append(torch.cat(parts))
    finally:
        model.train(was_training)
    s = stripes[0].shape[1]
    partners = true_partners(place_a, place_b, image_size[0], s)
    hits = {name: [0, 0] for name in ("path", "diagonal", "path_exact", "diagonal_exact")}
    for p in range(pairs):
        grid = element_distance(torch.cdist(stripes[0][p], stripes[1][p]).pow(2))
        for name, cells in (("path", shortest_path_cells(grid)), ("diagonal", [(i, i) for i in range(s)])):
            for key, tol in ((name, tolerance), (f"{name}_exact", 0)):
                good, judged = _score(cells, partners[p], tol)
                hits[key][0] += good
                hits[key][1] += judged
    out: dict[str, float] = {key: good / max(1, judged) for key, (good, judged) in hits.items()}
    return {**out, "cells": hits["path"][1], "pairs": pairs, "stripes": s, "tolerance": tolerance}
