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


def _sets(shards) -> list:
    return list(shards) if isinstance(shards, (list, tuple)) else [shards]


def load_manifests(shards) -> list[dict]:
    """The manifest of each shard set of `shards` (one location or a list: data.shards)."""
    return [load_manifest(s) for s in _sets(shards)]


def shard_set_tags(shards) -> dict[str, str]:
    """Run tags that identify the training data: the locations, the formats, and the sha256 of the
    manifest file (of the manifests' sha256s joined by commas, for several sets)."""
    import hashlib

    sets = _sets(shards)
    digests = [manifest_sha256(s) for s in sets]
    return {"dataset_shards": " | ".join(map(str, sets)),
            "dataset_manifest_sha256": digests[0] if len(digests) == 1 else
            hashlib.sha256(",".join(digests).encode()).hexdigest(),
            "dataset_format": "+".join(str(m.get("source_format", "unknown")) for m in load_manifests(sets))}


def shard_set_name(location) -> str:
    """A short name for a shard set: the last folder of its location (`/data/shards/market1501` ->
    market1501; for a `pipe:` command, of its last word), without {...} patterns."""
    text = str(location).removeprefix("pipe:").split()
    parts = [p for p in (text[-1] if text else "").split("/") if p and "{" not in p and not p.endswith(":")]
    return parts[-1] if parts else "shards"


def shard_set_inputs(shards, eval_choice=None) -> list[dict]:
    """The training's data, described for MLflow's dataset inputs (pipeline.tracking.datasets): one
    entry per shard set of `shards` (data.shards) with context "training" (its train split), and one
    with context "evaluation" for the set `eval_choice` (eval.shards) selects (query + gallery). Each:
    name, location, manifest_sha256, profile (source_format, num_classes, per split images /
    identities / cameras), context."""
    eval_source(shards, eval_choice)                         # a bad eval.shards index raises here
    sets = _sets(shards)
    chosen = 0 if eval_choice is None else eval_choice
    evaluated = sets[chosen] if isinstance(chosen, int) and not isinstance(chosen, bool) else chosen
    out = []
    for location, context, part in [(s, "training", "train") for s in sets] + \
                                   [(evaluated, "evaluation", "query+gallery")]:
        manifest = load_manifest(location)
        splits = {name: {k: int(v) for k, v in split.items() if k in ("images", "identities", "cameras")}
                  for name, split in manifest["splits"].items()}
        out.append({"name": f"{shard_set_name(location)}/{part}", "location": str(location),
                    "manifest_sha256": manifest_sha256(location), "context": context,
                    "profile": {"source_format": str(manifest.get("source_format", "unknown")),
                                "num_classes": int(manifest["num_classes"]), "splits": splits}})
    return out


__all__ = ["datasets", "shards", "synthetic", "transforms", "ShardError", "ShardSource", "DecodeCache",
           "TrainSets", "load_manifest", "load_manifests", "shard_set_inputs", "shard_set_name", "shard_set_tags",
           "manifest_sha256", "epoch_steps",
           "train_batches", "eval_batches", "eval_source", "read_images", "release_caches"]
