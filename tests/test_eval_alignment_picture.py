"""alignment.png's content: its rows are real queries of the tiny shards, each with a true match and a
negative, and the stripe pairs drawn are the aligned path's. (That reid-evaluate writes it beside the
other pictures, at the size the layout promises, is checked by test_eval_launch.py's real evaluation;
that a tracked training logs it, by test_tracking_train.py.)"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.alignment import shortest_path
from pipeline.config import Config
from pipeline.model import build_model

IMAGE_SIZE = (64, 32)


def test_rows_are_true_matches_and_negatives_with_the_aligned_path(tiny_shards, tmp_path, monkeypatch) -> None:
    from pipeline.data.locations import as_source
    from pipeline.evaluation import alignment_view, visualize
    from pipeline.evaluation.alignment_view import choose_images, write_alignment_picture

    chosen = choose_images(as_source(tiny_shards))
    assert 1 <= len(chosen) <= alignment_view.ALIGNMENT_QUERIES
    drawn = {}
    real = visualize.plot_alignments

    def spy(rows, path, **kwargs):
        drawn["rows"] = rows
        return real(rows, path, **kwargs)

    monkeypatch.setattr(visualize, "plot_alignments", spy)
    torch.manual_seed(1)
    cfg = Config()
    cfg.model.backbone, cfg.model.local_normalize = "resnet18", True
    model = build_model(cfg.model, num_classes=12)
    path = write_alignment_picture(model, tiny_shards, tmp_path / "a.png", image_size=IMAGE_SIZE,
                                   distance="global+local")
    assert path is not None and path.is_file() and model.training    # mode restored
    assert len(drawn["rows"]) == len(chosen)
    for row in drawn["rows"]:
        match, negative = row["pairs"]
        assert match["correct"] and not negative["correct"]
        for pair in (match, negative):
            grid = torch.as_tensor(pair["grid"])
            assert grid.shape == (4, 4) and ((grid >= 0) & (grid < 1)).all()
            cells = pair["cells"]
            assert cells[0] == (0, 0) and cells[-1] == (3, 3) and len(cells) == 7
            assert sum(float(grid[i, j]) for i, j in cells) == pytest.approx(shortest_path(grid).item())
    # model.local_normalize: unit stripes are at most 2 apart, so no element distance exceeds tanh(1).
    grids = np.stack([np.asarray(p["grid"]) for row in drawn["rows"] for p in row["pairs"]])
    assert grids.max() <= np.tanh(1.0) + 1e-9


def test_no_local_branch_no_picture(tiny_shards, tmp_path) -> None:
    from pipeline.evaluation.alignment_view import write_alignment_picture

    net = torch.nn.Sequential(torch.nn.Flatten())
    assert write_alignment_picture(net, tiny_shards, tmp_path / "a.png", image_size=IMAGE_SIZE) is None
    assert not (tmp_path / "a.png").exists()
