"""Data layer: dataset parsers -> WebDataset shards (anywhere) -> identity-balanced P×K batches on every rank.

    python launch/prepare_data.py --format market1501 --root Market-1501 --out shards/market
    batches = train_batches("shards/market", p=16, k=4, rank=r, world_size=w, epoch=e)
    batches = train_batches(["http://host/market/", "pipe:cat /data/duke/{name}"], ...,
                            cache_dir="/local/shards", decode_cache="host")

Modules: datasets (format parsers), synthetic, shards (writer, manifest, tar reader), locations (where
shards live: folders, URLs, pipe: commands; retries; node-local cache), plan (the pure epoch plan over
one or several shard sets), images (decoding), decoded (decode-once caches), stream (the train stream),
evalset (evaluation batches and single images), transforms (device-side augmentation).
"""
from . import datasets, shards, synthetic, transforms
from .decoded import DecodeCache, release_caches
from .evalset import eval_batches, eval_source, read_images
from .locations import ShardError, ShardSource
from .plan import TrainSets, epoch_steps
from .shards import load_manifest, manifest_sha256
from .stream import train_batches


def load_manifests(shards) -> list[dict]:
    """The manifest of each shard set of `shards` (one location or a list; data.shards)."""
    return [load_manifest(s) for s in (shards if isinstance(shards, (list, tuple)) else [shards])]


__all__ = ["datasets", "shards", "synthetic", "transforms", "ShardError", "ShardSource", "DecodeCache",
           "TrainSets", "load_manifest", "load_manifests", "manifest_sha256", "epoch_steps",
           "train_batches", "eval_batches", "eval_source", "read_images", "release_caches"]
