"""The synthetic pedestrian dataset: determinism, Market-1501 layout and protocol, difficulty, CLI."""
from __future__ import annotations

import importlib.util
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.datasets import MARKET_FOLDERS, parse_market1501, parse_market_name
from pipeline.data.synthetic import make_synthetic

ROOT = Path(__file__).resolve().parents[1]


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    kw = dict(train_ids=3, test_ids=2, image_size=(32, 16), images_per_id=6, progress=False)
    make_synthetic(tmp_path / "a", seed=5, **kw)
    make_synthetic(tmp_path / "b", seed=5, **kw)
    make_synthetic(tmp_path / "c", seed=6, **kw)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert a == b and len(a) > 20
    assert set(a.values()).isdisjoint(c.values())


def test_market_layout_protocol_and_nuisances(tiny_dataset):
    ds = parse_market1501(tiny_dataset)             # names parse with the real Market-1501 parser
    assert {s: len({r.pid for r in recs}) for s, recs in ds.splits.items()} == {"train": 12, "query": 8,
                                                                               "gallery": 9}
    for folder in MARKET_FOLDERS.values():
        for path in (tiny_dataset / folder).iterdir():
            assert Image.open(path).size == (32, 64) and Image.open(path).format == "JPEG"
    train_ids = {r.pid for r in ds.splits["train"]}
    test_ids = {r.pid for r in ds.splits["query"]}
    assert not train_ids & test_ids
    cams = defaultdict(set)
    for r in ds.splits["train"] + ds.splits["gallery"] + ds.splits["query"]:
        cams[r.pid].add(r.camid)
    assert all(len(cams[pid]) >= 2 for pid in train_ids | test_ids)
    assert len({r.camid for r in ds.splits["train"]}) == 6
    per_camera = defaultdict(int)
    for r in ds.splits["train"]:
        per_camera[r.pid, r.camid] += 1
    assert max(per_camera.values()) >= 3          # several images per identity and camera
    # every query has a correct match from another camera in the gallery
    for q in ds.splits["query"]:
        assert any(g.pid == q.pid and g.camid != q.camid for g in ds.splits["gallery"])
    gallery_names = [p.name for p in (tiny_dataset / "bounding_box_test").iterdir()]
    pids = [parse_market_name(n)[0] for n in gallery_names]
    assert pids.count(0) >= 1 and pids.count(-1) >= 1   # distractors and junk


def _rank1(q: np.ndarray, g: np.ndarray, qr, gr) -> float:
    """Rank-1 with the Market protocol (same pid and camera removed from the gallery)."""
    dist = ((q[:, None] - g[None]) ** 2).sum(-1)
    g_pid = np.array([r.pid for r in gr])
    g_cam = np.array([r.camid for r in gr])
    hits = []
    for i, r in enumerate(qr):
        keep = ~((g_pid == r.pid) & (g_cam == r.camid))
        hits.append(g_pid[keep][np.argmin(dist[i][keep])] == r.pid)
    return float(np.mean(hits))


def test_hard_for_shortcuts_but_the_person_carries_identity(tmp_path):
    """Whole-image colour statistics match the camera and background, not the person (a random network
    sees much the same); the colours of the person region do identify people well above chance."""
    make_synthetic(tmp_path, train_ids=1, test_ids=40, seed=0, image_size=(64, 32), progress=False)
    ds = parse_market1501(tmp_path)
    q, g = ds.splits["query"], ds.splits["gallery"]
    images = {r.path: np.asarray(Image.open(r.path).convert("RGB")).astype(np.float64) / 255 for r in q + g}

    def histogram(r):
        a = (images[r.path] * 3.999).astype(int)
        h = np.bincount((a[..., 0] * 16 + a[..., 1] * 4 + a[..., 2]).ravel(), minlength=64)
        return np.sqrt(h / h.sum())

    def person_colours(r):
        a = images[r.path][8:56, 10:22]
        return np.concatenate([a[:24].reshape(-1, 3).mean(0), a[24:].reshape(-1, 3).mean(0)])

    chance = 1 / 40
    shortcut = _rank1(np.stack([histogram(r) for r in q]), np.stack([histogram(r) for r in g]), q, g)
    person = _rank1(np.stack([person_colours(r) for r in q]), np.stack([person_colours(r) for r in g]), q, g)
    assert shortcut < 0.3
    assert person > 2 * chance


def test_make_synthetic_cli_and_image_size(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_synthetic", ROOT / "launch" / "make_synthetic.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "syn"
    assert cli.main(["--out", str(out), "--train-ids", "4", "--test-ids", "3", "--image-size", "48x24",
                     "--shards", str(tmp_path / "shards"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "num_classes (train labels 0..C-1): 4" in printed
    assert {Image.open(p).size for p in out.rglob("*.jpg")} == {(24, 48)}
    assert (tmp_path / "shards" / "manifest.json").is_file()
    with pytest.raises(SystemExit):
        cli.main(["--out", str(out), "--image-size", "big"])
    assert cli.main(["--out", str(out), "--cameras", "1", "--no-progress"]) == 2
    assert "at least 2" in capsys.readouterr().err


def test_misalignment_knob_moves_the_person_and_nothing_else(tmp_path):
    """`misalign` changes how the person sits in the crop: the same identities (and appearances), cameras
    and image counts at every level, the default (0.5) is the historical generator, and descriptors read from a
    fixed region of the crop (what a network without alignment sees) match people less well as the
    misalignment grows."""
    from pipeline.data.synthetic import misalignment

    kw = dict(train_ids=1, test_ids=40, seed=0, image_size=(64, 32), progress=False)
    levels = (0.0, 0.5, 1.0)
    for level in levels:
        make_synthetic(tmp_path / str(level), misalign=level, **kw)
    make_synthetic(tmp_path / "default", **kw)
    def who(level):   # (folder, pid, camera) of every identity's image; how many images in all
        found = [(p.parent.name, *parse_market_name(p.name)) for p in (tmp_path / str(level)).rglob("*.jpg")]
        return sorted(f for f in found if f[1] > 0), len(found)
    assert who(0.0) == who(0.5) == who(1.0)
    assert files(tmp_path / "default") == files(tmp_path / "0.5")
    assert files(tmp_path / "0.0") != files(tmp_path / "1.0")

    def fixed_region_rank1(root):
        ds = parse_market1501(root)
        q, g = ds.splits["query"], ds.splits["gallery"]

        def stripes(r):   # mean colour of 4 horizontal bands of the crop's central columns
            a = np.asarray(Image.open(r.path).convert("RGB")).astype(np.float64)[:, 10:22] / 255
            return np.concatenate([band.reshape(-1, 3).mean(0) for band in np.array_split(a, 4)])
        return _rank1(np.stack([stripes(r) for r in q]), np.stack([stripes(r) for r in g]), q, g)

    aligned, misaligned = fixed_region_rank1(tmp_path / "0.0"), fixed_region_rank1(tmp_path / "1.0")
    assert aligned > misaligned + 0.1, (aligned, misaligned)
    easy, hard = misalignment(0.0), misalignment(1.0)
    assert easy["truncated"] == easy["occluded"] == 0 and easy["scale_lo"] == easy["scale_hi"]
    assert hard["scale_lo"] < misalignment(0.5)["scale_lo"] < easy["scale_lo"]
    with pytest.raises(ValueError, match="misalign is 1.5"):
        misalignment(1.5)
