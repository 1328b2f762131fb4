"""alignment.png: a real evaluation (reid-evaluate's main on a real checkpoint and the tiny shards) writes
it beside the other pictures, at the size the layout promises; its rows are real queries, each with a
true match and a negative, and the stripe pairs drawn are the aligned path's."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.alignment import element_distance, shortest_path
from pipeline.checkpoint import CheckpointManager
from pipeline.config import Config
from pipeline.model import build_model

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = (64, 32)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory with one untrained ResNet-18 checkpoint (4 stripes at 64x32) in the engine's format."""
    cfg = Config()
    cfg.model.backbone, cfg.model.last_stride, cfg.data.image_size = "resnet18", 1, list(IMAGE_SIZE)
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=12)
    run = tmp_path_factory.mktemp("run")
    CheckpointManager(run / "checkpoints").save(
        {"model": model.state_dict(), "config": cfg.to_dict(), "num_classes": 12, "mutual": False,
         "epoch": 1, "global_step": 10}, "ckpt-E0001-S000010.pt")
    return run


def test_reid_evaluate_writes_the_alignment_picture(run_dir, tiny_shards, tmp_path) -> None:
    from pipeline.cli.evaluate import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--config", str(ROOT / "configs" / "test.yaml"), "--checkpoint", str(run_dir),
                     "--output-dir", str(tmp_path), f"data.shards={tiny_shards}", "eval.plots=true"])
    assert code == 0, err.getvalue()[-3000:]
    result = json.loads(out.getvalue().strip().splitlines()[-1])
    picture = tmp_path / "alignment.png"
    assert str(picture) in result["artifacts"] and (tmp_path / "cmc.png").is_file()
    assert "warning: alignment picture" not in err.getvalue()
    # Layout: tiles 256x128 (the 64x32 images scaled to 256 high), query between match and negative.
    with Image.open(picture) as im:
        width, height = im.size
    th, tw, border, gap, caption, margin, legend, title = 256, 128, 3, 110, 30, 24, 64, 36
    assert width == 2 * margin + 3 * (tw + 2 * border) + 2 * gap
    assert height == 4 * (th + 2 * border + caption) + legend + title


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
    # The element distances drawn are those of the network's (normalised) stripes.
    assert np.isfinite(np.asarray(drawn["rows"][0]["pairs"][0]["grid"])).all()
    assert element_distance(torch.tensor([4.0])).item() == pytest.approx(np.tanh(1.0))


def test_no_local_branch_no_picture(tiny_shards, tmp_path) -> None:
    from pipeline.evaluation.alignment_view import write_alignment_picture

    net = torch.nn.Sequential(torch.nn.Flatten())
    assert write_alignment_picture(net, tiny_shards, tmp_path / "a.png", image_size=IMAGE_SIZE) is None
    assert not (tmp_path / "a.png").exists()
