"""Shard writing: manifest contents, determinism (byte-identical), readability by stock WebDataset and
tar, atomicity on failure, and manifest validation."""
from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from collections import defaultdict
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from pipeline.data.datasets import parse_market1501
from pipeline.data.shards import ShardError, load_manifest, write_shards


def members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def samples(shards: Path, split: str) -> list[dict]:
    """Every sample of a split as {key, jpg, json} via tarfile, in shard order."""
    out = []
    for entry in load_manifest(shards)["splits"][split]["shards"]:
        with tarfile.open(shards / entry["name"]) as tar:
            grouped: dict[str, dict] = {}
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                grouped.setdefault(key, {"key": key})[ext] = tar.extractfile(m).read()
            out.extend(grouped.values())
    return out


def test_manifest_contents_and_shard_invariants(tiny_dataset, tiny_shards):
    ds = parse_market1501(tiny_dataset)
    manifest = load_manifest(tiny_shards)
    assert manifest["format_version"] == 1 and manifest["source_format"] == "market1501"
    train_pids = sorted({r.pid for r in ds.splits["train"]})
    assert manifest["num_classes"] == len(train_pids) == 12
    assert manifest["label_map"] == {str(pid): i for i, pid in enumerate(train_pids)}
    for split in ("train", "query", "gallery"):
        s = manifest["splits"][split]
        records = ds.splits[split]
        assert s["images"] == len(records) == sum(e["samples"] for e in s["shards"])
        assert s["identities"] == len({r.pid for r in records})
        for number, entry in enumerate(s["shards"]):
            path = tiny_shards / entry["name"]
            assert entry["name"] == f"{split}-{number:06d}.tar"
            assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            assert entry["bytes"] == path.stat().st_size
        got = samples(tiny_shards, split)
        metas = [json.loads(x["json"]) for x in got]
        # every image exactly once, bytes unchanged, index = position in the split
        assert sorted(m["source"] for m in metas) == sorted(r.source for r in records)
        assert [m["index"] for m in metas] == list(range(len(records)))
        originals = {r.source: r.path.read_bytes() for r in records}
        assert all(x["jpg"] == originals[m["source"]] for x, m in zip(got, metas))
        assert all("." not in x["key"] for x in got)
        if split == "train":
            assert all(m["label"] == manifest["label_map"][str(m["pid"])] for m in metas)
        else:
            assert all("label" not in m for m in metas)

    # train: every identity in exactly one shard, its images adjacent; shards balanced by images
    shard_of = defaultdict(set)
    for entry in manifest["splits"]["train"]["shards"]:
        pids = [pid for pid, _ in entry["ids"]]
        assert len(pids) == len(set(pids)) == entry["identities"]
        for pid in pids:
            shard_of[pid].add(entry["name"])
    assert all(len(names) == 1 for names in shard_of.values()) and len(shard_of) == 12
    pids_in_order = [json.loads(x["json"])["pid"] for x in samples(tiny_shards, "train")]
    changes = [pid for i, pid in enumerate(pids_in_order) if i == 0 or pid != pids_in_order[i - 1]]
    assert len(changes) == len(set(changes)), "an identity's images are not adjacent"
    sizes = [e["samples"] for e in manifest["splits"]["train"]["shards"]]
    largest = max(sum(1 for r in ds.splits["train"] if r.pid == pid) for pid in train_pids)
    assert len(sizes) > 1 and max(sizes) - min(sizes) <= largest


def test_byte_identical_reruns_and_fixed_tar_headers(tiny_dataset, tmp_path):
    ds = parse_market1501(tiny_dataset)
    a, b = tmp_path / "a", tmp_path / "b"
    write_shards(ds, a, images_per_shard=40, progress=False)
    write_shards(parse_market1501(tiny_dataset), b, images_per_shard=40, progress=False)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    for m in members(a / "train-000000.tar"):
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (946684800, 0, 0, "", "", 0o644)
    # a re-run into the same folder with fewer, larger shards removes the shards no longer listed
    write_shards(ds, a, images_per_shard=200, progress=False)
    listed = {e["name"] for s in load_manifest(a)["splits"].values() for e in s["shards"]}
    assert {p.name for p in a.glob("*.tar")} == listed and len(listed) < len(names) - 1


def test_readable_by_stock_webdataset_and_tar(tiny_shards):
    manifest = load_manifest(tiny_shards)
    for split in ("train", "gallery"):
        urls = [str(tiny_shards / e["name"]) for e in manifest["splits"][split]["shards"]]
        seen = []
        for sample in wds.WebDataset(urls, shardshuffle=False):
            meta = json.loads(sample["json"])
            assert sample["__key__"] == f"{split}_{meta['index']:08d}"
            assert Image.open(io.BytesIO(sample["jpg"])).size == (32, 64)
            seen.append(meta["index"])
        assert seen == list(range(manifest["splits"][split]["images"]))
        decoded = next(iter(wds.WebDataset(urls[:1], shardshuffle=False).decode("pil")))
        assert decoded["jpg"].mode == "RGB" and decoded["json"]["pid"] >= 0
    listing = subprocess.run(["tar", "-tvf", str(tiny_shards / "query-000000.tar")], check=True,
                             capture_output=True, text=True).stdout.splitlines()
    assert listing[0].split()[-1] == "query_00000000.jpg" and listing[1].split()[-1] == "query_00000000.json"
    assert len(listing) == 2 * manifest["splits"]["query"]["images"]


def test_a_failed_run_leaves_no_partial_shard_and_no_manifest(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    write_shards(parse_market1501(tiny_dataset), out, images_per_shard=40, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    ds = parse_market1501(tiny_dataset)
    victim = ds.splits["train"][50].path
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not an image at all")
    ds.splits["train"][50] = type(ds.splits["train"][50])(broken, "bounding_box_train/broken.jpg",
                                                          ds.splits["train"][50].pid, 1)
    with pytest.raises(ShardError, match=f"{broken} is not a JPEG or PNG"):
        write_shards(ds, out, images_per_shard=40, progress=False)
    after = sorted(p.name for p in out.iterdir())
    assert "manifest.json" not in after                       # no manifest pointing at a mixed state
    assert not [n for n in after if n.startswith(".") or "tmp" in n]   # no temporary leftovers
    for name in after:                                        # shards present are complete tar files
        data = (out / name).read_bytes()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            assert len(tar.getmembers()) % 2 == 0
        assert name in before
    with pytest.raises(ShardError, match="manifest.json not found"):
        load_manifest(out)
    assert victim.is_file()


def test_load_manifest_errors_name_the_file_and_key(tiny_shards, tmp_path):
    good = json.loads((tiny_shards / "manifest.json").read_text())

    def broken(mutate) -> Path:
        d = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        m = json.loads(json.dumps(good))
        mutate(m)
        (d / "manifest.json").write_text(json.dumps(m))
        return d

    cases = [
        (lambda m: m.pop("label_map"), "missing key 'label_map'"),
        (lambda m: m["splits"].pop("query"), "missing key 'splits.query'"),
        (lambda m: m["splits"]["train"]["shards"][0].pop("sha256"), r"missing key 'splits.train.shards\[0\].sha256'"),
        (lambda m: m["splits"]["gallery"].update(images=1), "'splits.gallery.images' is 1"),
        (lambda m: m.update(format_version=7), "format_version is 7"),
        (lambda m: m["splits"]["train"]["shards"][0].update(name="../evil.tar"), "expected train-000000.tar"),
        (lambda m: m.update(num_classes=3), "num_classes"),
    ]
    for mutate, message in cases:
        d = broken(mutate)
        with pytest.raises(ShardError, match=message) as err:
            load_manifest(d)
        assert str(d / "manifest.json") in str(err.value)
    bad_json = tmp_path / "badjson"
    bad_json.mkdir()
    (bad_json / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match="not valid JSON"):
        load_manifest(bad_json)
