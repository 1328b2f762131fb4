"""Shared fixtures.

`tiny_shards`: a tiny synthetic dataset (12 train identities, 8 test identities, 64x32 images, about
12 images per identity in 2-6 cameras) packed into real WebDataset shards (several train shards).
Built once per test session in about a second; treat it as read-only (copy it to modify it).
"""
from __future__ import annotations

from pathlib import Path

import pytest

TINY_IMAGE_SIZE = (64, 32)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """The tiny synthetic dataset in the Market-1501 layout (read-only)."""
    from pipeline.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("tiny_dataset")
    make_synthetic(root, train_ids=12, test_ids=8, seed=0, image_size=TINY_IMAGE_SIZE, images_per_id=12,
                   progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_shards(tiny_dataset, tmp_path_factory) -> Path:
    """Shards (manifest.json + train/query/gallery tars) of `tiny_dataset` (read-only)."""
    from pipeline.data.datasets import parse_market1501
    from pipeline.data.shards import write_shards

    out = tmp_path_factory.mktemp("tiny_shards")
    write_shards(parse_market1501(tiny_dataset), out, images_per_shard=40, progress=False)
    return out
