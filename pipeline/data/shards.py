"""WebDataset shards: writing them from parsed records, the manifest, and reading samples back.

Layout: `OUT/{train,query,gallery}-NNNNNN.tar` and `OUT/manifest.json`. Each sample is two members,
`<key>.jpg` (the source file's bytes, unchanged; `.png` for PNG sources such as CUHK03-np) and
`<key>.json` (`pid`, `camid`, `label` for train, `source`, `index`). Keys are `<split>_<index:08d>`:
no dots, so stock WebDataset groups the members correctly.

Why the layout looks like this:
- every train identity lives in exactly one shard, its images adjacent, so the stream can pick K images
  of an identity by position without decoding anything else (see stream.py); shards are balanced by
  image count (largest identity first into the lightest shard);
- the manifest lists, per train shard, its identities as `[pid, count]` runs in shard order. That makes
  the whole epoch plan computable from the manifest alone: every rank agrees on it without
  communicating, and a resumed run skips batches without reading them;
- tar headers carry fixed mtime/uid/gid/names and samples a fixed order, so the same input gives
  byte-identical shards (and the same sha256 in the manifest);
- every file is written under a temporary name and moved into place with os.replace; the old manifest
  is removed first and the new one written last, so a failed run never leaves a manifest pointing at
  partial or mismatching shards.

Reading (`iter_samples`, `read_samples`) streams a shard from any location (locations.py) through
webdataset's tar iteration, never uses member names as paths, checks that every member is at the
position the manifest predicts, and has the stream verify the shard's sha256 (locations.py says when).
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm
from webdataset.tariterators import tar_file_iterator

from ..fileio import atomic_path, atomic_write

from .images import JPEG_MAGIC
from .datasets import SPLITS, ParsedDataset, Record
from .locations import ShardError, ShardSource, as_source, finish_shard

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_IMAGES_PER_SHARD = 1000
SHARD_NAME = re.compile(r"^(train|query|gallery)-(\d{6})\.tar$")
MEMBER_NAME = re.compile(r"^(train|query|gallery)_(\d{8,})\.(jpg|png|json)$")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z: fixed so re-runs give byte-identical shards


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def sample_key(split: str, index: int) -> str:
    return f"{split}_{index:08d}"


def image_extension(data: bytes, where: str) -> str:
    if data.startswith(JPEG_MAGIC):
        return "jpg"
    if data.startswith(PNG_MAGIC):
        return "png"
    raise ShardError(f"{where} is not a JPEG or PNG file (first bytes {data[:8]!r}); remove it from "
                     "the dataset or convert it")


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def _group_train(records: list[Record], num_shards: int) -> list[list[list[Record]]]:
    """Identity groups per shard: whole identities, largest first into the lightest shard."""
    by_pid: dict[int, list[Record]] = {}
    for r in records:
        by_pid.setdefault(r.pid, []).append(r)
    groups = [sorted(g, key=lambda r: r.source) for _, g in sorted(by_pid.items())]
    loads = [0] * num_shards
    shards: list[list[list[Record]]] = [[] for _ in range(num_shards)]
    for group in sorted(groups, key=lambda g: (-len(g), g[0].pid)):
        target = min(range(num_shards), key=lambda i: (loads[i], i))
        shards[target].append(group)
        loads[target] += len(group)
    for shard in shards:
        shard.sort(key=lambda g: g[0].pid)
    return [s for s in shards if s]


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, _TAR_MTIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_shard(path: Path, split: str, samples: list[tuple[Record, int, int | None]],
                 bar: tqdm | None) -> dict:
    """Write one shard atomically; `samples` are (record, index, label) in order."""
    with atomic_path(path) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for record, index, label in samples:
                try:
                    data = record.path.read_bytes()
                except OSError as exc:
                    raise ShardError(f"cannot read {record.path}: {exc}") from None
                ext = image_extension(data, str(record.path))
                meta = {"pid": record.pid, "camid": record.camid, "source": record.source, "index": index}
                if label is not None:
                    meta["label"] = label
                meta_bytes = json.dumps(meta, sort_keys=True).encode()
                key = sample_key(split, index)
                tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
                tar.addfile(_tarinfo(f"{key}.json", len(meta_bytes)), io.BytesIO(meta_bytes))
                if bar is not None:
                    bar.update(1)
        entry = {"name": path.name, "samples": len(samples),
                 "identities": len({r.pid for r, _, _ in samples}),
                 "bytes": tmp.stat().st_size, "sha256": _sha256(tmp)}
    return entry


def write_shards(dataset: ParsedDataset, out_dir: str | Path, *,
                 images_per_shard: int = DEFAULT_IMAGES_PER_SHARD, progress: bool = True) -> dict:
    """Pack `dataset` into `out_dir` and return the manifest (also written as manifest.json)."""
    if images_per_shard < 1:
        raise ValueError(f"images_per_shard is {images_per_shard}; must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)

    train = dataset.splits["train"]
    label_map = {pid: label for label, pid in enumerate(sorted({r.pid for r in train}))}
    total = sum(len(dataset.splits[s]) for s in SPLITS)
    manifest: dict = {"format_version": FORMAT_VERSION, "source_format": dataset.format,
                      "num_classes": len(label_map),
                      "label_map": {str(pid): label for pid, label in label_map.items()}, "splits": {}}
    with tqdm(total=total, desc=f"packing {out}", unit="img", disable=not progress) as bar:
        for split in SPLITS:
            records = dataset.splits[split]
            num_shards = max(1, -(-len(records) // images_per_shard))
            if split == "train":
                chunks = [[r for group in shard for r in group] for shard in _group_train(records, num_shards)]
            else:
                ordered = sorted(records, key=lambda r: r.source)
                chunks = [ordered[i:i + images_per_shard] for i in range(0, len(ordered), images_per_shard)]
            entries, index = [], 0
            for number, chunk in enumerate(chunks):
                samples = []
                for record in chunk:
                    samples.append((record, index, label_map[record.pid] if split == "train" else None))
                    index += 1
                entry = _write_shard(out / shard_name(split, number), split, samples, bar)
                if split == "train":
                    runs: list[list[int]] = []
                    for record in chunk:
                        if runs and runs[-1][0] == record.pid:
                            runs[-1][1] += 1
                        else:
                            runs.append([record.pid, 1])
                    entry["ids"] = runs
                entries.append(entry)
            manifest["splits"][split] = {"images": len(records), "identities": len({r.pid for r in records}),
                                         "cameras": len({r.camid for r in records}), "shards": entries}
    keep = {e["name"] for s in manifest["splits"].values() for e in s["shards"]}
    for stale in out.iterdir():
        if SHARD_NAME.match(stale.name) and stale.name not in keep:
            stale.unlink()
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def format_summary(manifest: dict) -> str:
    lines = [f"{'split':<8} {'identities':>10} {'images':>8} {'shards':>7}"]
    for split in SPLITS:
        s = manifest["splits"][split]
        lines.append(f"{split:<8} {s['identities']:>10} {s['images']:>8} {len(s['shards']):>7}")
    lines.append(f"num_classes (train labels 0..C-1): {manifest['num_classes']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------------
def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ShardError(f"{where}: {msg}; re-run launch/prepare_data.py to rebuild the shards")


_REMOTE_MANIFESTS: dict[str, dict] = {}   # a remote manifest is read once per process


def load_manifest(shards: str | Path | ShardSource) -> dict:
    """Read and validate the manifest of a shard set (a location or a ShardSource); errors name the file
    or URL and the key at fault. A remote manifest is fetched once per process."""
    source = as_source(shards)
    where = source.url(MANIFEST)
    if source.remote and where in _REMOTE_MANIFESTS:
        return _REMOTE_MANIFESTS[where]
    if not source.remote and not Path(where).is_file():
        raise ShardError(f"{where} not found: {source} holds no shards. Create them with "
                         "`python launch/prepare_data.py --format FORMAT --root DIR --out "
                         f"{source}` (or launch/make_synthetic.py for the synthetic set)")
    try:
        raw = source.read_bytes(MANIFEST)
    except ShardError as exc:
        raise ShardError(f"{where} not found or unreachable ({exc}): is {source} the right shard "
                         "location?") from None
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShardError(f"{where}: not valid JSON ({exc}); re-run launch/prepare_data.py") from None
    validate_manifest(manifest, where)
    if source.remote:
        _REMOTE_MANIFESTS[where] = manifest
    return manifest


def manifest_sha256(shards: str | Path | ShardSource) -> str:
    """sha256 of the manifest file's bytes (recorded as a run tag)."""
    return hashlib.sha256(as_source(shards).read_bytes(MANIFEST)).hexdigest()


def validate_manifest(manifest: dict, where: str) -> None:
    _check(isinstance(manifest, dict), where, "top level must be an object")
    _check(manifest.get("format_version") == FORMAT_VERSION, where,
           f"format_version is {manifest.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    for key in ("source_format", "num_classes", "label_map", "splits"):
        _check(key in manifest, where, f"missing key '{key}'")
    splits = manifest["splits"]
    for split in SPLITS:
        _check(split in splits, where, f"missing key 'splits.{split}'")
        s = splits[split]
        for key in ("images", "identities", "shards"):
            _check(key in s, where, f"missing key 'splits.{split}.{key}'")
        _check(len(s["shards"]) > 0, where, f"'splits.{split}.shards' is empty")
        for i, entry in enumerate(s["shards"]):
            at = f"splits.{split}.shards[{i}]"
            for key in ("name", "samples", "identities", "sha256"):
                _check(key in entry, where, f"missing key '{at}.{key}'")
            m = SHARD_NAME.match(str(entry["name"]))
            _check(m is not None and m.group(1) == split, where,
                   f"'{at}.name' is {entry['name']!r}; expected {shard_name(split, i)}")
            if split == "train":
                _check("ids" in entry, where, f"missing key '{at}.ids'")
                _check(sum(c for _, c in entry["ids"]) == entry["samples"], where,
                       f"'{at}.ids' counts do not add up to its {entry['samples']} samples")
        _check(sum(e["samples"] for e in s["shards"]) == s["images"], where,
               f"'splits.{split}.images' is {s['images']} but its shards hold "
               f"{sum(e['samples'] for e in s['shards'])}")
    train_pids = {pid for e in splits["train"]["shards"] for pid, _ in e["ids"]}
    _check(len(manifest["label_map"]) == manifest["num_classes"] == len(train_pids), where,
           "'num_classes', 'label_map' and the train identities disagree")
    _check({int(p) for p in manifest["label_map"]} == train_pids, where,
           "'label_map' does not cover exactly the train identities")


def split_layout(manifest: dict, split: str) -> list[tuple[dict, int]]:
    """(shard entry, index of its first sample) for every shard of `split`."""
    out, first = [], 0
    for entry in manifest["splits"][split]["shards"]:
        out.append((entry, first))
        first += entry["samples"]
    return out


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
@dataclass
class Sample:
    position: int        # position within the shard
    key: str
    image: bytes
    meta: dict


def iter_samples(stream, split: str, first_index: int, samples: int,
                 positions: list[int] | None = None) -> Iterator[Sample]:
    """Samples at `positions` (all when None) of one open shard `stream`, in shard order, stopping after
    the last one. webdataset's tar iteration reads the members; only the wanted members' bytes are kept.
    Every member name is checked against the position the manifest predicts (never used as a path)."""
    where = f"shard {stream!r}"
    wanted = None if positions is None else set(positions)
    last = samples - 1 if positions is None else max(positions, default=-1)
    if last < 0:
        return
    seen = {"position": -1, "key": None, "members": 0}

    def select(name: str) -> bool:
        """Called for every member in order: checks its place, says whether to read its bytes."""
        m = MEMBER_NAME.match(name)
        if m is None or m.group(1) != split:
            raise ShardError(f"{where}: unexpected member {name!r}")
        key = f"{m.group(1)}_{m.group(2)}"
        if key != seen["key"]:
            if seen["key"] is not None and seen["members"] != 2:
                raise ShardError(f"{where}: sample {seen['key']} has {seen['members']} members, expected an "
                                 "image (.jpg or .png) and a .json")
            seen.update(position=seen["position"] + 1, key=key, members=0)
            expected = sample_key(split, first_index + seen["position"])
            if key != expected:
                raise ShardError(f"{where}: sample {seen['position']} is {key!r}, expected {expected!r}")
        seen["members"] += 1
        if seen["members"] > 2:
            raise ShardError(f"{where}: sample {key} has more than two members")
        return wanted is None or seen["position"] in wanted

    parts: dict[str, bytes] = {}
    current = None
    try:
        for member in tar_file_iterator(stream, select_files=select):
            key, ext = member["fname"].split(".")
            if key != current:
                current, parts = key, {}
            parts[ext] = member["data"]
            if len(parts) < 2:
                continue
            if set(parts) not in ({"jpg", "json"}, {"png", "json"}):
                raise ShardError(f"{where}: sample {key} has members {sorted(parts)}, expected an image "
                                 "(.jpg or .png) and a .json")
            position = int(key.split("_")[1]) - first_index
            meta = json.loads(parts["json"])
            if meta.get("index") != first_index + position:
                raise ShardError(f"{where}: sample {key} says index {meta.get('index')}, expected "
                                 f"{first_index + position}")
            yield Sample(position, key, parts.get("jpg") or parts["png"], meta)
            if position == last:
                return
    except tarfile.TarError as exc:
        raise ShardError(f"{where} is truncated or not a tar file ({exc}); re-run "
                         "launch/prepare_data.py") from None
    raise ShardError(f"{where} ends after {seen['position'] + 1} samples but the manifest lists {samples} "
                     "(truncated?); re-run launch/prepare_data.py")


def read_samples(shards: str | Path | ShardSource, split: str, entry: dict, first_index: int,
                 positions: list[int], verify: bool) -> dict[int, Sample]:
    """The samples at `positions` of one shard, in one sequential pass (then verified, see locations.py)."""
    source = as_source(shards)
    bad = [p for p in positions if not 0 <= p < entry["samples"]]
    if bad:
        raise ShardError(f"shard {source.url(entry['name'])}: positions {bad[:5]} outside its "
                         f"{entry['samples']} samples")
    stream, check = source.open_shard(entry, verify)
    try:
        found = {s.position: s for s in iter_samples(stream, split, first_index, entry["samples"], positions)}
        finish_shard(stream, check)
    finally:
        stream.close()
    return found
