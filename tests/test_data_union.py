"""Several shard sets trained as one (data.shards as a list): pids namespaced per set, labels
contiguous over the union, a `dataset` index in every batch, the plan over the union (identities of
all sets in the batches, disjoint across ranks), eval.shards choosing the evaluated set, and a short
real training run on a pair of sets."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.data import TrainSets, load_manifest, shard_set_tags, train_batches
from pipeline.data.datasets import parse_market1501
from pipeline.data.shards import write_shards
from pipeline.data.synthetic import make_synthetic

ROOT = Path(__file__).resolve().parents[1]
SIZE = (64, 32)


@pytest.fixture(scope="module")
def second_set(tmp_path_factory) -> Path:
    """Another tiny synthetic set (10 train identities) whose pids overlap the first set's."""
    base = tmp_path_factory.mktemp("second")
    make_synthetic(base / "raw", train_ids=10, test_ids=6, seed=7, image_size=SIZE, images_per_id=10, progress=False)
    write_shards(parse_market1501(base / "raw"), base / "shards", images_per_shard=30, progress=False)
    return base / "shards"


def test_pids_are_namespaced_and_labels_contiguous(tiny_shards, second_set):
    a, b = load_manifest(tiny_shards), load_manifest(second_set)
    assert {int(p) for p in a["label_map"]} & {int(p) for p in b["label_map"]}, "the sets should overlap"
    sets = TrainSets([a, b])
    assert sets.num_classes == a["num_classes"] + b["num_classes"]
    assert sets.pid_offsets == [0, max(int(p) for p in a["label_map"]) + 1]
    assert sets.label_offsets == [0, a["num_classes"]]
    labels = [sets.label(d, int(pid)) for d, m in enumerate((a, b)) for pid in m["label_map"]]
    assert sorted(labels) == list(range(sets.num_classes))
    pids = [sets.global_pid(d, int(pid)) for d, m in enumerate((a, b)) for pid in m["label_map"]]
    assert len(set(pids)) == len(pids)
    assert sets.images == a["splits"]["train"]["images"] + b["splits"]["train"]["images"]
    assert TrainSets(a).pid_offsets == [0] and TrainSets([a]).num_classes == a["num_classes"]


@pytest.mark.timeout(120)
def test_batches_draw_from_every_set_and_carry_the_dataset_index(tiny_shards, second_set):
    sets = TrainSets([load_manifest(tiny_shards), load_manifest(second_set)])
    p, k = 4, 2
    seen = set()
    for world_size in (1, 2):
        runs = [list(train_batches([tiny_shards, second_set], p=p, k=k, rank=r, world_size=world_size, epoch=1,
                                   image_size=SIZE, num_workers=2 if world_size == 1 else 0))
                for r in range(world_size)]
        assert len({len(run) for run in runs}) == 1
        for step in zip(*runs):
            per_rank = [set(b["pids"].tolist()) for b in step]
            assert sum(map(len, per_rank)) == len(set().union(*per_rank))       # disjoint across ranks
            for b in step:
                assert b["images"].shape == (p * k, 3, *SIZE) and len(set(b["pids"].tolist())) == p
                for pid, label, d in zip(b["pids"].tolist(), b["labels"].tolist(), b["dataset"].tolist()):
                    own = pid - sets.pid_offsets[d]
                    assert sets.label(d, own) == label
                    seen.add(d)
    assert seen == {0, 1}
    # the first set alone gives its own pids and labels (offsets 0)
    alone = next(iter(train_batches(tiny_shards, p=p, k=k, rank=0, world_size=1, epoch=0, image_size=SIZE)))
    assert alone["dataset"].eq(0).all()


def test_config_takes_a_list_and_eval_shards(tmp_path):
    cfg = load_config(ROOT / "configs/test.yaml", ["data.shards=[/a, http://h/b/]", "eval.shards=1",
                                                   "data.decode_cache=host", "data.cache_dir=/tmp/c"])
    assert cfg.data.shards == ["/a", "http://h/b/"] and cfg.eval.shards == 1
    assert load_config(ROOT / "configs/test.yaml", ["data.shards=/a"]).eval.shards is None
    with pytest.raises(ConfigError, match="eval.shards"):
        load_config(ROOT / "configs/test.yaml", ["data.shards=[/a]", "eval.shards=1"])
    with pytest.raises(ConfigError, match="data.decode_cache"):
        load_config(ROOT / "configs/test.yaml", ["data.decode_cache=gpu"])
    with pytest.raises(ConfigError, match="data.shards"):
        load_config(ROOT / "configs/test.yaml", ["data.shards=[]"])


def test_tags_identify_one_or_several_sets(tiny_shards, second_set):
    one, two = shard_set_tags(tiny_shards), shard_set_tags([tiny_shards, second_set])
    assert one["dataset_format"] == "market1501" and two["dataset_format"] == "market1501+market1501"
    assert len(one["dataset_manifest_sha256"]) == 64
    assert one["dataset_manifest_sha256"] != two["dataset_manifest_sha256"]
    assert str(second_set) in two["dataset_shards"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_short_training_run_on_two_sets(tiny_shards, second_set, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/test.yaml"),
                           f"data.shards=[{tiny_shards}, {second_set}]", "eval.shards=1", "data.decode_cache=host",
                           f"output_dir={out}", "tracking.enabled=false", "train.epochs=2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_completed"] == 2 and 0 <= summary["final_metrics"]["rank1"] <= 1
    ckpt = torch.load(Path(summary["checkpoint"]), map_location="cpu", weights_only=True)
    assert ckpt["num_classes"] == 12 + 10
    assert ckpt["config"]["data"]["shards"] == [str(tiny_shards), str(second_set)]
    metrics = json.loads(next((out / "eval").rglob("metrics.json")).read_text())
    queries = [load_manifest(s)["splits"]["query"]["images"] for s in (tiny_shards, second_set)]
    assert queries[0] != queries[1] and metrics["valid_queries"] == queries[1]     # evaluated on set 1
