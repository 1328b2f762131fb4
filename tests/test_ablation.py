"""The ablation (pipeline/ablation/, launch/ablate.py).

Pure parts, no training: statistics over seeds and paired gains, the table's formatting, argument and
override handling, the refusal of a command that does not match what an earlier one trained, the
misalignment curve and the plots.

End to end (slow; real training processes, tiny data, `--nproc 1`, one epoch of 4 steps):
- 2 seeds x {global, aligned} on the tiny shards: table, JSON and plot written; the JSON's per-seed
  values are the run folders' test results and its means/stds are what the table prints; MLflow has
  one parent and 4 FINISHED children nested under it with their test metrics, the plot on the parent;
  `global` trained with loss.local_weight=0 and `aligned` with the recipe's weight; re-running the
  same command trains nothing and prints the same JSON; different overrides are refused (exit 2).
- `--synthetic-misalign 0,1` at toy size: the data drawn per level, misalign_gain.png, both levels in
  the JSON.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.ablation import (AblationError, AblationOptions, TEST_VARIANTS, aggregate, check_user_overrides,
                               compute_gains, describe, differences, fmt_stat, format_block, format_report,
                               level_name, misalign_curve, parse_levels, parse_seeds, parse_tests,
                               parse_variants, plot_bars, plot_curve, run_ablation, run_overrides,
                               variant_overrides)
from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TEST_RECIPE = ROOT / "configs/test.yaml"
TESTS = list(TEST_VARIANTS)


# --------------------------------------------------------------------------------------------------
# Pure parts
# --------------------------------------------------------------------------------------------------
def _per_run(values: dict[str, list[float]]) -> dict:
    """per_run[variant][seed][test][metric] with every test/metric of a seed = values[variant][i] plus
    a small offset per test (so the tests differ)."""
    return {v: {s: {t: {m: x + 0.01 * j for m in ("rank1", "mAP", "mINP")} for j, t in enumerate(TESTS)}
                for s, x in enumerate(xs)} for v, xs in values.items()}


def test_describe_is_mean_sample_std_min_max():
    d = describe([0.5, 0.7, 0.6], seeds=[0, 1, 2])
    assert d["mean"] == pytest.approx(0.6) and d["std"] == pytest.approx(statistics.stdev([0.5, 0.7, 0.6]))
    assert (d["min"], d["max"], d["n"], d["values"], d["seeds"]) == (0.5, 0.7, 3, [0.5, 0.7, 0.6], [0, 1, 2])
    one = describe([0.4])
    assert one["std"] is None and one["mean"] == 0.4
    with pytest.raises(ValueError):
        describe([])


def test_aggregate_and_paired_gains():
    per_run = _per_run({"global": [0.50, 0.60], "aligned": [0.55, 0.70], "mutual": [0.60, 0.70]})
    results = aggregate(per_run, ["global", "aligned", "mutual"], [0, 1], TESTS)
    assert results["aligned"]["global"]["rank1"]["values"] == [0.55, 0.70]
    assert results["aligned"]["global_local"]["mAP"]["mean"] == pytest.approx(0.635)
    gains = {g["key"]: g for g in compute_gains(per_run, ["global", "aligned", "mutual"], [0, 1], TESTS)}
    assert set(gains) == {"aligned-global", "mutual-aligned", *(f"{v}/{t}-global" for v in
                          ("global", "aligned", "mutual") for t in ("global_local", "global_rerank"))}
    # per-seed differences: aligned - global = [0.05, 0.10]; their std, not the results' spread
    assert gains["aligned-global"]["rank1"]["values"] == pytest.approx([0.05, 0.10])
    assert gains["aligned-global"]["rank1"]["std"] == pytest.approx(statistics.stdev([0.05, 0.10]))
    assert gains["mutual-aligned"]["mAP"]["values"] == pytest.approx([0.05, 0.0])
    # offsets are 0.01 x the test's position in TEST_VARIANTS: global_rerank is 4th after global
    assert gains["aligned/global_rerank-global"]["mINP"]["mean"] == pytest.approx(
        0.01 * (TESTS.index("global_rerank") - TESTS.index("global")))
    # without the global test or a variant, those gains are left out
    assert [g["key"] for g in compute_gains(per_run, ["aligned"], [0, 1], ["global_local"])] == []


def test_fmt_stat_percent_one_decimal():
    assert fmt_stat(describe([0.701, 0.725, 0.713])) == "71.3 ± 1.2 (70.1–72.5)"
    assert fmt_stat(describe([0.713])) == "71.3"
    assert fmt_stat(describe([0.025, 0.037]), signed=True) == "+3.1 ± 0.8 (+2.5 to +3.7)"
    assert fmt_stat(describe([-0.01]), signed=True) == "-1.0"


def test_table_rows_are_the_statistics():
    per_run = _per_run({"global": [0.50, 0.60], "aligned": [0.55, 0.70]})
    block = {"misalign": None, "shards": "/data/shards",
             "results": aggregate(per_run, ["global", "aligned"], [0, 1], TESTS),
             "gains": compute_gains(per_run, ["global", "aligned"], [0, 1], TESTS)}
    text = format_block(block, "Data: /data/shards")
    assert "| aligned | global+local re-ranked | 67.5 ± 10.6 (60.0–75.0) |" in text
    assert "| aligned − global | global | +7.5 ± 3.5 (+5.0 to +10.0) |" in text
    report = {"recipe": "configs/demo.yaml", "seeds": [0, 1], "nproc": 2, "overrides": ["train.epochs=2"],
              "train_variants": ["global", "aligned"], "test_variants": TESTS, "aligned_local_weight": 1.0,
              "blocks": {"shards": block}}
    md = format_report(report)
    assert md.startswith("# AlignedReID ablation: configs/demo.yaml")
    assert "train.epochs=2" in md and "loss.local_weight=1" in md and "untrained stripe head" in md


def test_argument_parsing_errors_name_the_problem():
    assert parse_seeds(None, None) == [0, 1, 2] and parse_seeds(2, None) == [0, 1]
    assert parse_seeds(None, "3,5") == [3, 5]
    for seeds, seed_list, fragment in ((2, "0,1", "not both"), (0, None, "at least 1"),
                                       (None, "0,x", "integers"), (None, "1,1", "no repeats")):
        with pytest.raises(AblationError, match=fragment):
            parse_seeds(seeds, seed_list)
    assert parse_variants("mutual,global", ("global",)) == ["global", "mutual"]
    with pytest.raises(AblationError, match="unknown \\['local'\\]"):
        parse_variants("global,local", ("global",))
    assert parse_tests("global+local,global") == ["global", "global_local"]
    assert parse_tests("local,global+local (plain sum)") == ["global_local_sum", "local"]
    with pytest.raises(AblationError, match="unknown 'stripes'"):
        parse_tests("stripes")
    assert parse_levels("1,0,0.25") == [0.0, 0.25, 1.0] and level_name(0.25) == "misalign-0.25"
    assert level_name(1.0) == "misalign-1"
    with pytest.raises(AblationError, match="out of range: \\[1.5\\]"):
        parse_levels("0,1.5")


@pytest.mark.parametrize("override, fragment", [
    ("seed=3", "--seed-list"), ("output_dir=x", "--out"), ("mutual.enabled=true", "--variants"),
    ("tracking.tags.a=b", "tags its runs"), ("tracking.uri=x", "--tracking-uri"), ("train.lr", "key.sub=value"),
])
def test_reserved_or_malformed_overrides_are_refused(override, fragment):
    with pytest.raises(AblationError, match=re.escape(fragment)):
        check_user_overrides(["train.epochs=2", override])


def test_variant_overrides_make_the_variants():
    assert variant_overrides("global", 0.7) == ["loss.local_weight=0", "loss.local_id_weight=0",
                                                "mutual.enabled=false"]
    assert variant_overrides("aligned", 0.7) == ["loss.local_weight=0.7", "mutual.enabled=false"]
    assert variant_overrides("mutual", 0.0) == ["loss.local_weight=1.0", "mutual.enabled=true"]
    user = ["train.epochs=3", "loss.local_weight=0.5", "eval.every_epochs=2"]
    for variant, weight, mutual in (("global", 0.0, False), ("aligned", 0.5, False), ("mutual", 0.5, True)):
        cfg = load_config(TEST_RECIPE, run_overrides(user, variant, 4, "/data/x", 0.5))
        assert (cfg.loss.local_weight, cfg.mutual.enabled, cfg.seed) == (weight, mutual, 4)
        assert cfg.train.epochs == 3 and cfg.data.shards == "/data/x"
        assert cfg.eval.every_epochs == 2 and cfg.tracking.log_model is False   # the user's eval setting wins
    assert load_config(TEST_RECIPE, run_overrides([], "global", 0, "/d", 1.0)).eval.every_epochs == 0


def test_differences_name_the_keys():
    assert differences({"a": 1, "b": [1, 2]}, {"a": 1, "b": [1, 2]}) == []
    assert differences({"a": 1, "b": 2}, {"a": 3, "c": None}) == ["a: 1 -> 3", "b: 2 -> (unset)", "c: (unset) -> null"]


def test_refusals_before_any_training(tmp_path, tiny_shards):
    def opts(**kw):
        base = dict(recipe=TEST_RECIPE, out=tmp_path / "abl", seeds=[0], variants=["global", "aligned"],
                    overrides=["tracking.enabled=false"])
        return AblationOptions(**{**base, **kw})

    with pytest.raises(AblationError, match="no shards at"):
        run_ablation(opts(shards=tmp_path / "nowhere"), log=lambda _: None)
    with pytest.raises(AblationError, match="not both"):
        run_ablation(opts(shards=tiny_shards, levels=[0.0]), log=lambda _: None)
    with pytest.raises(AblationError, match="drop the data.shards override"):
        run_ablation(opts(levels=[0.0], overrides=["data.shards=/x"]), log=lambda _: None)
    with pytest.raises(AblationError, match="must include global and aligned"):
        run_ablation(opts(levels=[0.0], variants=["aligned", "mutual"]), log=lambda _: None)
    with pytest.raises(AblationError, match="the recipe with your overrides: .*train.lr"):
        run_ablation(opts(shards=tiny_shards, overrides=["tracking.enabled=false", "train.lr=-1"],
                          variants=["mutual"]), log=lambda _: None)
    # a stored run trained otherwise: refused, naming the key, before anything trains
    run_dir = tmp_path / "abl/global/seed0"
    run_dir.mkdir(parents=True)
    good = load_config(TEST_RECIPE, run_overrides(["tracking.enabled=false"], "global", 0, tiny_shards.resolve(), 1.0))
    from pipeline.ablation import comparable
    stored = {**comparable(good), "train.lr": 0.5}
    (run_dir / "ablation_run.json").write_text(json.dumps({"overrides": ["train.lr=0.5"],
                                                           "compare": {"nproc": 1, **stored}}))
    with pytest.raises(AblationError, match=r"(?s)run .*seed0 was trained with other settings.*"
                                            r"train\.lr: 0\.5 -> 0\.001.*its overrides: train\.lr=0\.5"):
        run_ablation(opts(shards=tiny_shards), log=lambda _: None)
    assert not (run_dir / "train.log").exists()


def test_cached_forward_gives_the_same_results(tiny_shards):
    """The four test variants through the memoised network equal evaluate() on the network itself,
    and the network runs once per image."""
    import torch

    from pipeline.ablation import cached_forward
    from pipeline.config import ModelConfig
    from pipeline.evaluation import evaluate
    from pipeline.model import build_model

    torch.manual_seed(0)
    net = build_model(ModelConfig(backbone="resnet18", last_stride=1), num_classes=12).eval()
    calls = []
    net.register_forward_hook(lambda _m, inputs, _o: calls.append(inputs[0].shape[0]))
    cached = cached_forward(net, with_local=True)
    kwargs = dict(image_size=(64, 32), batch_size=64, plots=False, progress=False)
    for key, (_, distance, rerank) in TEST_VARIANTS.items():
        plain = evaluate(net, tiny_shards, distance=distance, rerank=rerank, **kwargs)
        n_plain = sum(calls)
        calls.clear()
        memo = evaluate(cached, tiny_shards, distance=distance, rerank=rerank, **kwargs)
        for metric in ("rank1", "mAP", "mINP"):
            assert memo[metric] == pytest.approx(plain[metric], abs=1e-6), (key, metric)
        assert sum(calls) == (n_plain if key == "global" else 0)    # computed once, then read back
        calls.clear()


def _curve_blocks() -> dict:
    blocks = {}
    for level, (g, a) in ((0.0, ([0.6, 0.62], [0.61, 0.62])), (1.0, ([0.3, 0.34], [0.4, 0.41]))):
        per_run = _per_run({"global": g, "aligned": a})
        blocks[level_name(level)] = {"misalign": level, "shards": f"/d/{level}",
                                     "results": aggregate(per_run, ["global", "aligned"], [0, 1], TESTS),
                                     "gains": compute_gains(per_run, ["global", "aligned"], [0, 1], TESTS)}
    return blocks


def test_misalign_curve_and_plots(tmp_path):
    blocks = _curve_blocks()
    curve = misalign_curve(blocks, ["global", "aligned"])
    assert curve["levels"] == [0.0, 1.0]
    assert [s["mean"] for s in curve["gain"]["rank1"]] == pytest.approx([0.005, 0.085])
    assert [s["mean"] for s in curve["absolute"]["global"]["mAP"]] == pytest.approx([0.61, 0.32])
    assert misalign_curve({"shards": {**blocks["misalign-0"], "misalign": None}}, ["global", "aligned"]) is None
    report = {"train_variants": ["global", "aligned"], "test_variants": TESTS, "blocks": blocks}
    for path in (plot_bars(report, tmp_path / "bars.png"), plot_curve(curve, tmp_path / "curve.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------
# End to end: real training processes
# --------------------------------------------------------------------------------------------------
def ablate(cwd: Path, *args: str, timeout: int = 360) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, str(ROOT / "launch/ablate.py"), "--config", str(TEST_RECIPE),
                           "--nproc", "1", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_test_metrics_are_linked_to_the_childs_logged_model(tmp_path):
    """With tracking.log_model=true a child run has a logged model (and every tracked training has
    an evaluation dataset input): its test metrics are then that model's metrics, on that dataset.
    A real store; the run, input and model are made with the client as the trainer's tracker makes
    them (no training needed)."""
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelOutput

    from pipeline.ablation.tracking import AblationTracking
    from pipeline.tracking.datasets import dataset_input

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("abl")
    child = client.create_run(experiment_id, run_name="aligned seed0").info.run_id
    profile = {"source_format": "market1501", "num_classes": 3, "splits": {}}
    client.log_inputs(child, [dataset_input("tiny/query+gallery", "/data/tiny", "ab" * 32, profile, "evaluation")])
    model = client.create_logged_model(experiment_id, name="model", source_run_id=child)
    client.log_outputs(child, [LoggedModelOutput(model.model_id, step=4)])
    bare = client.create_run(experiment_id, run_name="global seed0").info.run_id     # no model, no input

    tracking = AblationTracking(uri, "abl")
    tests = {"global": {"rank1": 0.5, "rank5": 0.7, "mAP": 0.25, "mINP": 0.125}}
    tracking.log_child(child, {"ablation.variant": "aligned"}, tests)
    tracking.log_child(bare, {"ablation.variant": "global"}, tests)
    linked = {m.key: m for m in client.get_logged_model(model.model_id).metrics}
    assert {k: m.value for k, m in linked.items()} == {"test/global/rank1": 0.5, "test/global/rank5": 0.7,
                                                       "test/global/mAP": 0.25, "test/global/mINP": 0.125}
    assert {(m.dataset_name, m.dataset_digest) for m in linked.values()} == {("tiny/query+gallery", "ab" * 16)}
    assert client.get_run(child).data.metrics["test/global/mAP"] == 0.25
    assert client.get_run(bare).data.metrics["test/global/mAP"] == 0.25
    assert not tracking._warned


def test_ablation_end_to_end(tiny_shards, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "abl"
    args = ["--shards", str(tiny_shards), "--seeds", "2", "--variants", "global,aligned", "--out", str(out),
            "--tracking-uri", uri, "train.epochs=1"]
    proc = ablate(tmp_path, *args)
    report = ok(proc)
    for k, name in enumerate(("global seed 0", "aligned seed 0", "global seed 1", "aligned seed 1"), 1):
        assert f"[{k}/4] {name}: training -> {out}" in proc.stdout
    assert "epoch 1/1" not in proc.stdout            # training output goes to train.log only

    # files, and the JSON is the run folders' results; the table prints its statistics
    assert report == json.loads((out / "ablation.json").read_text())
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / "ablation.md").read_text()
    assert table in proc.stdout
    block = report["blocks"]["shards"]
    for variant in ("global", "aligned"):
        for test, label in report["test_labels"].items():
            stats = block["results"][variant][test]
            for metric in ("rank1", "mAP", "mINP"):
                values = [json.loads((out / variant / f"seed{s}" / f"test_{test}.json").read_text())[metric]
                          for s in (0, 1)]
                assert stats[metric]["values"] == values and stats[metric]["seeds"] == [0, 1]
                assert stats[metric]["mean"] == pytest.approx(statistics.fmean(values))
                assert stats[metric]["std"] == pytest.approx(statistics.stdev(values))
            row = f"| {variant} | {label} | " + " | ".join(fmt_stat(stats[m]) for m in ("rank1", "mAP", "mINP"))
            assert row in table
    gain = next(g for g in block["gains"] if g["key"] == "aligned-global")
    assert gain["rank1"]["values"] == pytest.approx(
        [a - g for a, g in zip(block["results"]["aligned"]["global"]["rank1"]["values"],
                               block["results"]["global"]["global"]["rank1"]["values"])])

    # the variants really trained as they say
    import yaml
    for variant, weight in (("global", 0.0), ("aligned", 1.0)):
        cfg = yaml.safe_load((out / variant / "seed1" / "config.yaml").read_text())
        assert cfg["loss"]["local_weight"] == weight and cfg["seed"] == 1 and cfg["mutual"]["enabled"] is False
        assert cfg["eval"]["every_epochs"] == 0 and cfg["train"]["epochs"] == 1

    # MLflow: one parent, 4 FINISHED children nested under it, test metrics on them, plot on the parent
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("ablation-test").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.run_id == report["parent_run_id"] and parent.info.status == "FINISHED"
    assert parent.info.run_name.startswith("ablation test ")
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"ablation.png", "ablation.md",
                                                                            "ablation.json"}
    assert parent.data.metrics["aligned/global/rank1_mean"] == pytest.approx(
        block["results"]["aligned"]["global"]["rank1"]["mean"])
    assert parent.data.metrics["global/global_local/mAP_std"] == pytest.approx(
        block["results"]["global"]["global_local"]["mAP"]["std"])
    seen = set()
    for child in children:
        tags, params = child.data.tags, child.data.params
        assert tags["mlflow.parentRunId"] == parent.info.run_id and child.info.status == "FINISHED"
        variant, seed = tags["ablation.variant"], int(tags["ablation.seed"])
        seen.add((variant, seed))
        assert params["loss.local_weight"] == ("0.0" if variant == "global" else "1.0")
        assert block["runs"][variant][str(seed)]["mlflow_run_id"] == child.info.run_id
        for test in TEST_VARIANTS:
            assert child.data.metrics[f"test/{test}/rank1"] == pytest.approx(
                block["results"][variant][test]["rank1"]["values"][seed])
    assert seen == {(v, s) for v in ("global", "aligned") for s in (0, 1)}

    # the same command again: nothing trains, same JSON
    logs = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/train.log")}
    summaries = {p: p.read_text() for p in out.glob("*/seed*/summary.json")}
    again = ablate(tmp_path, *args)
    assert ok(again) == report
    assert again.stdout.count("already trained") == 4 and "training ->" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/train.log")} == logs
    assert {p: p.read_text() for p in out.glob("*/seed*/summary.json")} == summaries
    assert len(client.search_runs([parent.info.experiment_id])) == 5     # the parent was reused

    # other overrides: refused, naming the key, nothing trained
    refused = ablate(tmp_path, *args, "train.lr=5e-4", timeout=120)
    assert refused.returncode == 2
    assert "was trained with other settings" in refused.stderr and "train.lr: 0.001 -> 0.0005" in refused.stderr
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/train.log")} == logs

    # a training that did not finish (no summary.json; its checkpoint is there) is re-launched with the
    # same command and resumes; its missing test results are recomputed, identical
    crashed = out / "global" / "seed1"
    (crashed / "summary.json").unlink()
    for path in crashed.glob("test_*.json"):
        path.unlink()
    resumed = ablate(tmp_path, *args)
    assert ok(resumed) == report
    assert "[3/4] global seed 1: training (resuming)" in resumed.stdout
    assert resumed.stdout.count("already trained") == 3
    assert (crashed / "train.log").read_text().count("\n=== ") == 2       # one header per launch


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_failed_training_stops_with_its_log(tiny_shards, tmp_path):
    out = tmp_path / "abl"
    proc = ablate(tmp_path, "--shards", str(tiny_shards), "--seed-list", "0", "--variants", "global,aligned",
                  "--out", str(out), "train.epochs=1", "data.p=40", "tracking.enabled=false", timeout=180)
    assert proc.returncode == 1, proc.stderr[-3000:]
    log = out / "global" / "seed0" / "train.log"
    assert "[1/2] global seed 0: training" in proc.stdout and "[2/2]" not in proc.stdout
    assert "training failed with exit status" in proc.stderr and f"(full log: {log})" in proc.stderr
    assert log.read_text().strip().splitlines()[-1] in proc.stderr       # the log's tail is shown


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_misalignment_curve_end_to_end(tmp_path):
    out = tmp_path / "curve"
    proc = ablate(tmp_path, "--synthetic-misalign", "0,1", "--train-ids", "8", "--test-ids", "4",
                  "--seed-list", "0", "--out", str(out), "--test-variants", "global,global+local",
                  "--alignment-pairs", "12", "data.image_size=[64,32]", "train.epochs=1", "tracking.enabled=false")
    report = ok(proc)
    assert list(report["blocks"]) == ["misalign-0", "misalign-1"]
    assert [b["misalign"] for b in report["blocks"].values()] == [0.0, 1.0]
    for level in ("0", "1"):
        data = json.loads((out / "data" / f"misalign-{level}" / "data.json").read_text())
        assert data == {"misalign": float(level), "train_ids": 8, "test_ids": 4, "data_seed": 0,
                        "image_size": [64, 32]}
        assert (out / f"misalign-{level}" / "aligned" / "seed0" / "summary.json").is_file()
    curve = report["misalign_curve"]
    assert curve["levels"] == [0.0, 1.0] and len(curve["gain"]["rank1"]) == 2
    assert curve["gain"]["mAP"][1]["values"] == pytest.approx(
        [report["blocks"]["misalign-1"]["results"]["aligned"]["global"]["mAP"]["values"][0]
         - report["blocks"]["misalign-1"]["results"]["global"]["global"]["mAP"]["values"][0]])
    assert (out / "misalign_gain.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "ablation.md").read_text()
    assert "Synthetic data, misalignment 0" in md and "Synthetic data, misalignment 1" in md
    assert "## Misalignment curve: aligned − global" in md
    # the aligned branch's figures: alignment on pairs of known geometry, and the branch diagnostics
    for level in ("0", "1"):
        align = json.loads((out / f"misalign-{level}" / "aligned" / "seed0" / "alignment.json").read_text())
        assert align["pairs"] == 12 and 0 <= align["trained"]["path"] <= 1 and align["misalign"] == float(level)
        branch = report["blocks"][f"misalign-{level}"]["branch"]
        assert branch["aligned"]["alignment/path"]["values"] == [align["trained"]["path"]]
        assert 0 <= branch["aligned"]["local_branch/saturated"]["mean"] <= 1
        assert "local_branch/saturated" not in branch["global"]      # no local loss, no diagnostics
    assert "| path on the true stripe ±1 |" in md and "| element distances > 0.99 |" in md
    assert report["parent_run_id"] is None and not (tmp_path / "mlflow.db").exists()
