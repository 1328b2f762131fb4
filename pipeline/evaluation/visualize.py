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


def plot_alignments(rows: list[dict], path: str | Path, *, tile_size: tuple[int, int] = (256, 128),
                    title: str | None = None) -> Path:
    """AlignedReID's picture of typical alignments: one row per query, the query beside gallery images,
    each image cut into its S horizontal stripes (S = the feature map's height; alternate stripes
    shaded, stripe numbers at the side), and a line between the centres of every stripe pair (i, j)
    on the shortest path through the S x S element-distance grid, coloured by that element distance
    (green near 0, red near 1) and thicker when closer.

    Each row: {'query': PIL image, 'query_label': str, 'pairs': [pair, ...]} with one or two pairs, each
    {'image': PIL image, 'label': str, 'correct': bool, 'grid': [S, S'] element distances (query stripe
    i, gallery stripe j), 'cells': the path's (i, j) from pipeline.alignment.shortest_path_cells}. With
    two pairs the query stands between them (first pair on its left, second on its right)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    if not rows:
        raise ValueError("no alignments to draw (rows is empty)")
    if any(not 1 <= len(r["pairs"]) <= 2 for r in rows):
        raise ValueError("each row needs one or two gallery pairs")
    th, tw = tile_size
    border, gap, caption, margin, legend = 3, 110, 30, 24, 64
    cols = max(1 + len(r["pairs"]) for r in rows)
    step_y = th + 2 * border + caption
    width = 2 * margin + cols * (tw + 2 * border) + (cols - 1) * gap
    top = 36 if title else 0
    height = len(rows) * step_y + legend + top
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    cmap, norm = colormaps["RdYlGn_r"], Normalize(0.0, 1.0)
    texts, bands, lines = [], [], []
    for r, row in enumerate(rows):
        pairs = row["pairs"]
        order = [pairs[0], None, pairs[1]] if len(pairs) == 2 else [None, pairs[0]]
        y = top + r * step_y + caption
        x_of = {}
        for c, item in enumerate(order):
            x = margin + c * (tw + 2 * border + gap)
            image = row["query"] if item is None else item["image"]
            colour = QUERY if item is None else (CORRECT if item["correct"] else WRONG)
            canvas[y:y + th + 2 * border, x:x + tw + 2 * border] = _tile(image, colour, tile_size, border)
            label = row.get("query_label", "query") if item is None else item["label"]
            texts.append((x + border + tw / 2, y - 4, label, colour, "center"))
            x_of[c] = x + border
        q_col = order.index(None)
        q_stripes = len(pairs[0]["grid"])
        for c, item in enumerate(order):
            stripes = q_stripes if item is None else len(item["grid"][0])
            bands.append((x_of[c], y + border, stripes))
        for c, item in enumerate(order):
            if item is None:
                continue
            grid = np.asarray(item["grid"], dtype=float)
            g_stripes = grid.shape[1]
            left = c < q_col
            x_q = x_of[q_col] + (0 if left else tw)          # the query's edge facing this gallery image
            x_g = x_of[c] + (tw if left else 0)
            for i, j in item["cells"]:
                yq = y + border + (i + 0.5) * th / q_stripes
                yg = y + border + (j + 0.5) * th / g_stripes
                d = float(grid[i, j])
                lines.append(((x_q, x_g), (yq, yg), cmap(norm(d)), 0.8 + 2.4 * (1 - d)))
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(canvas, interpolation="nearest")
    for x0, y0, stripes in bands:
        step = th / stripes
        for s in range(stripes):
            if s % 2:
                ax.add_patch(Rectangle((x0 - 0.5, y0 + s * step - 0.5), tw, step, facecolor="white",
                                       alpha=0.22, edgecolor="none"))
            if s:
                ax.plot((x0 - 0.5, x0 + tw - 0.5), (y0 + s * step - 0.5,) * 2, color="black", lw=0.4, alpha=0.5)
    for xs, ys, colour, lw in lines:
        ax.plot(xs, ys, color=colour, lw=lw, solid_capstyle="round")
        ax.plot(xs, ys, "o", color=colour, ms=2.5)
    for x, y, text, colour, ha in texts:
        ax.text(x, y, text, color=colour, fontsize=7, ha=ha, va="bottom")
    if title:
        ax.text(width / 2, 6, title, fontsize=7.5, ha="center", va="top", linespacing=1.4)
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.set_axis_off()
    cax = fig.add_axes((0.15, 34 / height, 0.7, 10 / height))
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax, orientation="horizontal")
    bar.set_label("element distance tanh(‖f − g‖ / 2) of each matched stripe pair", fontsize=7, labelpad=2)
    bar.ax.tick_params(labelsize=6)
    return _save(fig, path)
