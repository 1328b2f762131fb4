"""Distributed feature extraction and the collective evaluate, on real shards with real gloo groups.

The shards are the tiny synthetic set cut to 13 queries and 91 gallery images (neither divisible by
2 or 3) and packed 16 images per shard, so rank shares start and end inside shards. W spawned
processes (W = 2, 3) must produce exactly the features of one process, in the same order, and every
rank must get the same metrics dict, with and without re-ranking.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.model import AlignedReID

from gloo_ranks import PROCESS_TIMEOUT_S, run_ranks

QUERIES, GALLERY = 13, 91
IMAGE_SIZE = (64, 32)


def make_model(path: Path | None = None) -> AlignedReID:
    torch.manual_seed(0)
    model = AlignedReID(20, backbone="resnet18", last_stride=1, width=8, local_dim=16)
    if path is not None:
        model.load_state_dict(torch.load(path, weights_only=True))
    return model


@pytest.fixture(scope="module")
def odd_shards(tiny_dataset, tmp_path_factory) -> Path:
    from pipeline.data.datasets import parse_market1501
    from pipeline.data.shards import write_shards

    ds = parse_market1501(tiny_dataset)
    assert len(ds.splits["query"]) >= QUERIES and len(ds.splits["gallery"]) >= GALLERY
    ds.splits["query"] = ds.splits["query"][:QUERIES]
    ds.splits["gallery"] = ds.splits["gallery"][:GALLERY]
    out = tmp_path_factory.mktemp("odd_shards")
    write_shards(ds, out, images_per_shard=16, progress=False)
    return out


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "weights.pt"
    torch.save(make_model().state_dict(), path)
    return path


def _worker(rank: int, world: int, out_dir: str, shards: str, weights: str) -> None:
    from pipeline.distributed import cleanup, init_distributed
    from pipeline.evaluation.features import evaluate, extract_features

    init_distributed("gloo", timeout_s=60)
    model = make_model(Path(weights)).train()
    result = {}
    with torch.no_grad():
        model.eval()
        for split in ("query", "gallery"):
            result[split] = extract_features(model, shards, split, image_size=IMAGE_SIZE,
                                             batch_size=6, with_local=True, progress=False)
    model.train()
    result["plain"] = evaluate(model, shards, image_size=IMAGE_SIZE, batch_size=8,
                               distance="global+local", progress=False,
                               output_dir=str(Path(out_dir) / "eval") if rank == 0 else None)
    result["still_training"] = model.training
    result["reranked"] = evaluate(model, shards, image_size=IMAGE_SIZE, batch_size=9,
                                  rerank=True, plots=False, progress=False)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    cleanup()


def assert_same_metrics(a: dict, b: dict) -> None:
    for key in ("rank1", "rank5", "rank10", "mAP", "mINP", "valid_queries"):
        assert a[key] == pytest.approx(b[key], abs=1e-6), key
    np.testing.assert_allclose(a["cmc"], b["cmc"], atol=1e-6)


@pytest.fixture(scope="module")
def single(odd_shards, model_file) -> dict:
    """One process: features and metrics to compare the ranks against."""
    from pipeline.evaluation.features import evaluate, extract_features

    model = make_model(model_file).eval()
    out = {split: extract_features(model, odd_shards, split, image_size=IMAGE_SIZE, batch_size=32,
                                   with_local=True, progress=False)
           for split in ("query", "gallery")}
    out["plain"] = evaluate(model, odd_shards, image_size=IMAGE_SIZE, distance="global+local",
                            progress=False, plots=False)
    out["reranked"] = evaluate(model, odd_shards, image_size=IMAGE_SIZE, rerank=True,
                               progress=False, plots=False)
    out["still_eval"] = not model.training
    return out


def test_single_process_features_and_metrics(single, odd_shards):
    from pipeline.data import load_manifest
    from pipeline.evaluation import rank_metrics_from_features

    manifest = load_manifest(odd_shards)
    for split, n in (("query", QUERIES), ("gallery", GALLERY)):
        part = single[split]
        assert part["global"].shape[0] == part["local"].shape[0] == part["pids"].shape[0] == n
        assert manifest["splits"][split]["images"] == n
    assert len(set(manifest["splits"]["gallery"]["shards"][i]["name"] for i in range(3))) == 3
    q, g = single["query"], single["gallery"]
    norm = torch.nn.functional.normalize
    # Test time equals training: this model was not trained with normalised stripes, so evaluation
    # uses them as the model gives them (the global feature is always L2-normalised).
    assert not torch.allclose(q["local"].norm(dim=2), torch.ones(()))
    expect = rank_metrics_from_features(norm(q["global"], dim=1), norm(g["global"], dim=1), q["pids"],
                                        g["pids"], q["camids"], g["camids"],
                                        local=(q["local"], g["local"]), distance="global+local")
    assert_same_metrics(single["plain"], expect)
    assert single["plain"]["valid_queries"] == QUERIES
    assert single["still_eval"]
    for key in ("rank1", "rank5", "rank10", "mAP", "mINP"):
        assert 0.0 <= single["reranked"][key] <= 1.0


@pytest.mark.slow
@pytest.mark.timeout(PROCESS_TIMEOUT_S + 60)
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_equal_single_process(world, odd_shards, model_file, single, tmp_path):
    ranks = run_ranks(_worker, world, tmp_path, str(odd_shards), str(model_file), weights_only=False)
    for r, got in enumerate(ranks):
        for split in ("query", "gallery"):
            for key in ("pids", "camids"):
                assert torch.equal(got[split][key], single[split][key]), (r, split, key)
            for key in ("global", "local"):
                torch.testing.assert_close(got[split][key], single[split][key], atol=1e-5, rtol=1e-5)
        assert_same_metrics(got["plain"], single["plain"])
        assert_same_metrics(got["reranked"], single["reranked"])
        for key, value in ranks[0]["plain"].items():      # bit-identical on every rank
            assert np.array_equal(got["plain"][key], value), (r, key)
        assert got["still_training"], "evaluate must restore the model's training mode"
    artifacts = ranks[0]["plain"]["artifacts"]
    assert [Path(a).name for a in artifacts] == ["cmc.png", "ranked_lists.png", "metrics.json"]
    assert all(r["plain"]["artifacts"] == artifacts for r in ranks)
    for png in artifacts[:2]:
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] > 100


def test_duplicated_or_missing_rows_are_errors(odd_shards, model_file, monkeypatch):
    """A reader that delivers an image twice (or drops one) must be caught, not silently used."""
    from pipeline.evaluation import features

    real = features.eval_batches

    def duplicating(*args, **kwargs):
        batches = list(real(*args, **kwargs))
        return batches + batches[:1]

    monkeypatch.setattr(features, "eval_batches", duplicating)
    model = make_model(model_file).eval()
    with pytest.raises(RuntimeError, match=r"duplicated \[0, 1"):
        features.extract_features(model, odd_shards, "query", image_size=IMAGE_SIZE, batch_size=4,
                                  progress=False)

    def dropping(*args, **kwargs):
        return list(real(*args, **kwargs))[1:]

    monkeypatch.setattr(features, "eval_batches", dropping)
    with pytest.raises(RuntimeError, match=r"missing \[0, 1, 2, 3\]"):
        features.extract_features(model, odd_shards, "query", image_size=IMAGE_SIZE, batch_size=4,
                                  progress=False)
