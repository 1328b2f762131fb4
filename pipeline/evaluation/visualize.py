"""Pictures of an evaluation: the CMC curve and ranked lists (a query and its top matches, each marked
correct or incorrect).

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend switch,
nothing needs a display) and written atomically: a temporary name in the same folder, then os.replace.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from pipeline.fileio import atomic_path

CORRECT, WRONG, QUERY = "#2ca02c", "#d62728", "#1f77b4"


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        FigureCanvasAgg(fig).print_figure(tmp, format="png", dpi=fig.dpi)
    return path


def plot_cmc(cmc: Sequence[float] | np.ndarray, path: str | Path, *, title: str = "CMC",
             label: str | None = None) -> Path:
    """Line plot of cmc[k] (fraction of queries matched within rank k+1) against rank; returns path."""
    cmc = np.asarray(cmc, dtype=float)
    if cmc.ndim != 1 or cmc.size == 0:
        raise ValueError(f"cmc must be a non-empty 1-D array, got shape {cmc.shape}")
    ranks = np.arange(1, cmc.size + 1)
    fig = Figure(figsize=(5, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot(ranks, 100 * cmc, marker="." if cmc.size <= 50 else None, label=label)
    for k in (1, 5, 10):
        if k <= cmc.size:
            ax.annotate(f"R{k} {100 * cmc[k - 1]:.1f}", (k, 100 * cmc[k - 1]), fontsize=8,
                        textcoords="offset points", xytext=(4, -12))
    ax.set(xlabel="rank", ylabel="matching rate (%)", title=title, xlim=(1, cmc.size),
           ylim=(max(0.0, 100 * cmc[0] - 5), 100.5))
    ax.grid(alpha=0.3)
    if label:
        ax.legend(loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def ranked_lists(dist_rows: np.ndarray | torch.Tensor, q_pids: Sequence[int], q_camids: Sequence[int],
                 g_pids: np.ndarray, g_camids: np.ndarray, topk: int = 10) -> list[dict]:
    """Top-`topk` gallery items of some queries under the evaluation protocol (junk and same-pid
    same-camera items left out; ties by gallery index).

    dist_rows: [n, G] distances of the n chosen queries. Returns one dict per query: `gallery`
    (indices), `correct` (bools), `distance` (floats)."""
    dist_rows = torch.as_tensor(np.asarray(dist_rows) if not isinstance(dist_rows, torch.Tensor)
                                else dist_rows).double()
    g_pids, g_camids = np.asarray(g_pids), np.asarray(g_camids)
    out = []
    for row, pid, cam in zip(dist_rows, q_pids, q_camids):
        row = row.numpy()
        keep = np.flatnonzero((g_pids != -1) & ~((g_pids == pid) & (g_camids == cam)))
        order = keep[np.argsort(row[keep], kind="stable")[:topk]]
        out.append({"gallery": order.tolist(), "correct": (g_pids[order] == pid).tolist(),
                    "distance": row[order].tolist()})
    return out


def _tile(image: Image.Image, colour: str, size: tuple[int, int], border: int) -> np.ndarray:
    h, w = size
    rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.uint8)
    tile = np.empty((h + 2 * border, w + 2 * border, 3), dtype=np.uint8)
    tile[:] = rgb
    tile[border:border + h, border:border + w] = np.asarray(
        image.convert("RGB").resize((w, h), Image.Resampling.BILINEAR))
    return tile


def plot_ranked_lists(entries: list[dict], query_images: Sequence[Image.Image],
                      gallery_images: Sequence[Sequence[Image.Image]], path: str | Path, *,
                      query_labels: Sequence[str] | None = None,
                      tile_size: tuple[int, int] = (128, 64)) -> Path:
    """One row per query: the query (blue frame), then its ranked gallery images framed green
    (correct) or red (incorrect, also marked 'x'), captioned with rank and distance. `entries` come
    from :func:`ranked_lists`; `gallery_images[i]` holds the images of `entries[i]['gallery']` in
    that order. The tiles are composed into one image shown on one axes (dozens of matplotlib axes
    take seconds to lay out)."""
    if not entries:
        raise ValueError("no ranked lists to draw (entries is empty)")
    if len(query_images) != len(entries) or len(gallery_images) != len(entries):
        raise ValueError(f"{len(entries)} ranked lists but {len(query_images)} query images and "
                         f"{len(gallery_images)} gallery image lists")
    border, gap, caption = 4, 8, 18
    th, tw = tile_size[0] + 2 * border, tile_size[1] + 2 * border
    cols = 1 + max(len(e["gallery"]) for e in entries)
    step_x, step_y = tw + gap, th + gap + caption
    margin, split = 3 * gap, 2 * gap        # room for wide captions; a gap after the query column
    canvas = np.full((len(entries) * step_y, 2 * margin + split + cols * step_x, 3), 255,
                     dtype=np.uint8)
    captions = []
    for r, entry in enumerate(entries):
        label = query_labels[r] if query_labels is not None else f"query {r}"
        row = [(query_images[r], QUERY, label)]
        row += [(image, CORRECT if ok else WRONG, f"{k + 1}: {d:.3g}{'' if ok else ' x'}")
                for k, (image, ok, d) in enumerate(zip(gallery_images[r], entry["correct"],
                                                       entry["distance"]))]
        for c, (image, colour, text) in enumerate(row):
            y, x = r * step_y + caption, margin + c * step_x + (split if c else 0)
            canvas[y:y + th, x:x + tw] = _tile(image, colour, tile_size, border)
            captions.append((x + tw / 2, y - 3, text, colour))
    height, width = canvas.shape[:2]
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(canvas, interpolation="nearest")
    for x, y, text, colour in captions:
        ax.text(x, y, text, color=colour, fontsize=7, ha="center", va="bottom")
    ax.set_axis_off()
    return _save(fig, path)
