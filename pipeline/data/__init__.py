"""Data layer: dataset parsers -> WebDataset shards -> identity-balanced P×K batches on every rank.

    python launch/prepare_data.py --format market1501 --root Market-1501 --out shards/market
    batches = train_batches("shards/market", p=16, k=4, rank=r, world_size=w, epoch=e)
"""
from . import datasets, shards, synthetic, transforms
from .shards import ShardError, load_manifest
from .stream import eval_batches, read_images, train_batches

__all__ = ["datasets", "shards", "synthetic", "transforms", "ShardError", "load_manifest", "train_batches",
           "eval_batches", "read_images"]
