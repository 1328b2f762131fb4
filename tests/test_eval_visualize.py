"""Pictures: the ranked lists follow the protocol, the PNGs are real and mark correct/incorrect."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.evaluation.visualize import (CORRECT, QUERY, WRONG, plot_cmc, plot_ranked_lists,
                                           ranked_lists)


def colour_pixels(path, colour: str) -> int:
    rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB")).astype(int)
    return int((np.abs(pixels - rgb).sum(-1) < 30).sum())


def test_ranked_lists_leave_out_junk_and_same_camera_matches():
    g_pids = np.array([5, 5, -1, 3, 5, 0, 3])
    g_cams = np.array([1, 2, 1, 1, 3, 2, 2])
    dist = np.array([[0.1, 0.5, 0.0, 0.2, 0.2, 0.9, 0.3]])
    (entry,) = ranked_lists(dist, [5], [1], g_pids, g_cams, topk=4)
    # item 0 (same pid and camera) and item 2 (junk) are removed; the tie 3/4 keeps index order.
    assert entry["gallery"] == [3, 4, 6, 1]
    assert entry["correct"] == [False, True, False, True]
    assert entry["distance"] == pytest.approx([0.2, 0.2, 0.3, 0.5])


def test_pictures_are_pngs_with_the_right_marks(tmp_path):
    cmc_path = plot_cmc(np.linspace(0.4, 1.0, 20), tmp_path / "sub" / "cmc.png", label="run")
    with Image.open(cmc_path) as im:
        assert im.format == "PNG" and im.size[0] >= 300
    grey = [Image.new("RGB", (32, 64), (128, 128, 128)) for _ in range(4)]
    all_right = [{"gallery": [0, 1, 2], "correct": [True] * 3, "distance": [0.1, 0.2, 0.3]}]
    path = plot_ranked_lists(all_right, grey[:1], [grey[:3]], tmp_path / "right.png")
    assert colour_pixels(path, CORRECT) > 500 and colour_pixels(path, QUERY) > 200
    assert colour_pixels(path, WRONG) == 0
    mixed = [{"gallery": [0, 1, 2], "correct": [True, False, False], "distance": [0.1, 0.2, 0.3]}]
    path = plot_ranked_lists(mixed, grey[:1], [grey[:3]], tmp_path / "mixed.png")
    assert colour_pixels(path, WRONG) > 1.5 * colour_pixels(path, CORRECT) > 0   # 2 red, 1 green
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixed.png", "right.png", "sub"]  # no temp files


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="non-empty 1-D"):
        plot_cmc([], tmp_path / "c.png")
    with pytest.raises(ValueError, match="1 ranked lists but 0 query images"):
        plot_ranked_lists([{"gallery": [0], "correct": [True], "distance": [0.1]}], [], [[]],
                          tmp_path / "r.png")
