"""launch/slurm/*.sbatch on a real two-node SLURM cluster (Debian's slurm-wlm, started on localhost).

- the cluster runs a step on each of its two nodes, with the project's Python;
- train.sbatch --nodes 2 trains the tiny config to the end with world size 2, tracked in MLflow, and
  evaluate.sbatch scores its checkpoint as the training's final evaluation did;
- USR1 to the job's steps (what `--signal=USR1@90` sends before the time limit) reaches the
  trainers through torchrun; they checkpoint, the script requeues the job, and the requeued job
  resumes from the checkpoint and finishes (SLURM restart count 1, the same MLflow run);
- a bad override fails the job with the key named in its log;
- the scripts pass shellcheck.

SLURM and MUNGE come from `make system-deps` (tests/slurm/install.sh); the daemons are started by
tests/slurm/cluster.py in a temporary directory and stopped at the end, also on failure.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "slurm"))

from cluster import ClusterError, LocalSlurmCluster, which  # noqa: E402
from gloo_ranks import free_port  # noqa: E402

PY = sys.executable
TRAIN = "launch/slurm/train.sbatch"
EXPERIMENT = "slurm-test"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    try:
        for cmd in ("slurmctld", "slurmd", "munged", "sbatch"):
            which(cmd)
    except ClusterError as exc:
        pytest.fail(f"{exc} (the Makefile's `system-deps` target does it before `make test`)")
    with LocalSlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


def job_env() -> dict[str, str]:
    """What the jobs need beyond the submitting environment, which sbatch exports to them."""
    return {"REID_PYTHON": PY, "RDZV_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


def submit_train(cluster: LocalSlurmCluster, tmp: Path, *overrides: str) -> tuple[int, Path, Path]:
    out, log = tmp / "run", tmp / "job.log"
    job = cluster.sbatch(["--nodes", "2", f"--output={log}", TRAIN, "--config", "configs/test.yaml",
                          "--output-dir", str(out), *overrides], cwd=ROOT, env=job_env())
    return job, out, log


def log_tail(log: Path, n: int = 6000) -> str:
    return log.read_text(errors="replace")[-n:] if log.is_file() else f"(no {log})"


def tracking_store(tmp: Path) -> tuple[str, list[str]]:
    """A fresh MLflow sqlite store whose experiment keeps artifacts under `tmp` (MLflow's default is
    ./mlruns of the job's working directory, the checkout); returns its URI and the overrides to use it.
    The bound on the tracker's calls is raised: creating the store's tables takes seconds on a busy
    CI machine."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp}/mlflow.db"
    MlflowClient(tracking_uri=uri).create_experiment(EXPERIMENT, artifact_location=str(tmp / "artifacts"))
    return uri, [f"tracking.uri={uri}", f"tracking.experiment={EXPERIMENT}", "tracking.timeout_s=30"]


def tracked_runs(uri: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])


@pytest.mark.timeout(30)
def test_sbatch_scripts_pass_shellcheck():
    scripts = [ROOT / "launch/slurm/train.sbatch", ROOT / "launch/slurm/evaluate.sbatch",
               ROOT / "launch/slurm/common.sh", ROOT / "tests/slurm/install.sh"]
    proc = subprocess.run([str(Path(PY).parent / "shellcheck"), "-x", *map(str, scripts)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.slurm
@pytest.mark.timeout(60)
def test_cluster_runs_a_step_on_each_node(cluster, tmp_path):
    script = tmp_path / "hello.sh"
    script.write_text("#!/bin/bash\nset -e\nsrun bash -c 'echo node=$SLURMD_NODENAME'\n"
                      f"srun {PY} -c 'import torch.distributed as d; print(\"dist\", d.is_available())'\n")
    log = tmp_path / "hello.log"
    job = cluster.sbatch(["--nodes", "2", "--ntasks-per-node", "1", f"--output={log}", str(script)])
    info = cluster.wait(job, timeout=45)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    assert sorted(line for line in text.splitlines() if line.startswith("node=")) == ["node=n1", "node=n2"]
    assert text.count("dist True") == 2


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(270)
def test_train_sbatch_two_nodes_tracked(cluster, tiny_shards, tmp_path):
    uri, tracking = tracking_store(tmp_path)
    job, out, log = submit_train(cluster, tmp_path, f"data.shards={tiny_shards}", "train.epochs=1",
                                 "train.steps_per_epoch=3", *tracking)
    info = cluster.wait(job, timeout=150)
    assert info["JobState"] == "COMPLETED", log_tail(log)
    assert info["Restarts"] == "0" and info["NumNodes"] == "2"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_completed"] == 1, summary
    assert "rendezvous 127.0.0.1:" in log.read_text()  # the head node's NodeAddr, from scontrol
    runs = tracked_runs(uri)
    assert [r.info.status for r in runs] == ["FINISHED"], runs
    assert runs[0].info.run_id == summary["mlflow_run_id"]

    # evaluate.sbatch on the trained checkpoint reproduces the training's final evaluation.
    eval_log = tmp_path / "eval.log"
    job = cluster.sbatch([f"--output={eval_log}", "launch/slurm/evaluate.sbatch", "--config",
                          "configs/test.yaml", "--checkpoint", str(out), f"data.shards={tiny_shards}",
                          f"output_dir={out}"], cwd=ROOT, env=job_env())
    info = cluster.wait(job, timeout=90)
    assert info["JobState"] == "COMPLETED", log_tail(eval_log)
    result = [json.loads(line) for line in eval_log.read_text().splitlines() if line.startswith('{"')][-1]
    for key in ("rank1", "mAP", "mINP"):
        assert result[key] == pytest.approx(summary["final_metrics"][key], abs=1e-6), \
            (f"{key}: evaluate.sbatch gives {result[key]}, the training's final evaluation "
             f"{summary['final_metrics'][key]}: every rank must evaluate the checkpointed weights and "
             f"BatchNorm buffers")


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_usr1_checkpoints_requeues_and_resumes(cluster, tiny_shards, tmp_path):
    uri, tracking = tracking_store(tmp_path)
    job, out, log = submit_train(cluster, tmp_path, f"data.shards={tiny_shards}", "train.epochs=2",
                                 "train.steps_per_epoch=4", "checkpoint.every_steps=2", *tracking)
    # Signal mid-run: once the first step checkpoint exists, with steps still to go.
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while not latest.is_file():
        info = cluster.job(job)
        assert info["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), log_tail(log)
        assert time.monotonic() < deadline, f"no checkpoint within 120 s\n{log_tail(log)}"
        time.sleep(0.25)
    cluster.signal_steps(job, "USR1")

    info = cluster.wait(job, timeout=160)  # through REQUEUED and PENDING to the end
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-6000:]
    assert int(info["Restarts"]) == 1, info
    assert "requeueing job" in text and "(restart 1)" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_completed"] == 2
    assert summary["resumed_from"], f"the requeued job did not resume: {summary}"
    resumed_step = int(re.search(r"S(\d+)", summary["resumed_from"][-1]).group(1))
    assert 2 <= resumed_step < summary["global_step"] == 8
    assert not (out / "preempted.json").exists()
    runs = tracked_runs(uri)
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]], "a resumed job continues its run"
    assert runs[0].info.status == "FINISHED"


@pytest.mark.slurm
@pytest.mark.timeout(60)
def test_bad_override_fails_the_job_naming_the_key(cluster, tmp_path):
    job, out, log = submit_train(cluster, tmp_path, "data.shards=/nonexistent", "data.k=1")
    info = cluster.wait(job, timeout=45)
    assert info["JobState"] == "FAILED"
    assert "'data.k' is 1" in log.read_text(), log_tail(log)
    assert not out.exists() or not any(out.iterdir())
