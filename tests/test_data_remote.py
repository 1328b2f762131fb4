"""Shards read from elsewhere than a local folder, against real servers (no mocks):

- a `python -m http.server` process on 127.0.0.1 serves a shard folder: train batches (pids and
  pixels), evaluation batches and ranked-list pictures read through it equal the local ones, with and
  without DataLoader workers, with and without the node-local cache;
- `pipe:` command templates and fsspec URLs (`memory://`) read the same bytes;
- the node-local cache downloads each shard once, even with concurrent workers, and reuses it;
- failures are errors that name the URL, within a bounded time: a server stopped mid-epoch (retried,
  then given up), a server that accepts connections and never answers (read timeouts), a missing file
  (not retried), a modified shard (sha256), a failing pipe command;
- two `torchrun` "nodes" train with shards reachable only over HTTP, sharing one cache folder.
"""
from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from gloo_ranks import free_port

from pipeline.data import ShardError, ShardSource, eval_batches, load_manifest, read_images, train_batches

ROOT = Path(__file__).resolve().parents[1]
SIZE = (64, 32)


@contextlib.contextmanager
def http_server(directory: Path, log: Path):
    """`python -m http.server` serving `directory` on 127.0.0.1; yields (base URL, process)."""
    port = free_port()
    with open(log, "ab") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port),
                                 "--directory", str(directory)], stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/", proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


def gets(log: Path) -> Counter:
    """GET requests per file name in an http.server log."""
    return Counter(m.group(1) for m in re.finditer(r'"GET /([^ ?]+)[^"]*" 200', log.read_text()))


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) > 0 and all(
        x.keys() == y.keys() and all(torch.equal(x[key], y[key]) for key in x) for x, y in zip(a, b))


def train(shards, **kw) -> list[dict]:
    kw = {"p": 4, "k": 2, "rank": 0, "world_size": 1, "epoch": 0, "image_size": SIZE, **kw}
    return list(train_batches(shards, **kw))


@pytest.fixture(scope="module")
def served(tiny_shards, tmp_path_factory):
    log = tmp_path_factory.mktemp("http") / "server.log"
    with http_server(Path(tiny_shards), log) as (url, _):
        yield url, log


@pytest.mark.timeout(120)
def test_http_batches_equal_local_batches(tiny_shards, served, tmp_path):
    url, _ = served
    for world_size, rank in ((1, 0), (2, 1)):
        local = train(tiny_shards, world_size=world_size, rank=rank)
        assert same(local, train(url, world_size=world_size, rank=rank))
    local = train(tiny_shards, epoch=1)
    assert same(local, train(url, epoch=1, num_workers=2))
    assert same(local, train(url, epoch=1, num_workers=2, cache_dir=tmp_path / "cache"))
    for split in ("query", "gallery"):
        want = list(eval_batches(tiny_shards, split, batch_size=16, image_size=SIZE))
        assert same(want, list(eval_batches(url, split, batch_size=16, image_size=SIZE)))
    remote = read_images(url, "gallery", [5, 0])
    assert [im.tobytes() for im in remote] == [im.tobytes() for im in read_images(tiny_shards, "gallery", [5, 0])]


@pytest.mark.timeout(60)
def test_pipe_and_fsspec_locations_read_the_same_bytes(tiny_shards, tmp_path):
    local = train(tiny_shards, epoch=2)
    assert same(local, train(f"pipe:cat {tiny_shards}/{{name}}", epoch=2))
    assert same(local, train(f"file://{tiny_shards}", epoch=2))
    import fsspec

    memory = fsspec.filesystem("memory")
    for path in Path(tiny_shards).iterdir():
        memory.pipe(f"/shards-{tmp_path.name}/{path.name}", path.read_bytes())
    assert same(local, train(f"memory://shards-{tmp_path.name}", epoch=2))
    with pytest.raises(ShardError, match=r"has no \{name\}"):
        train(f"pipe:cat {tiny_shards}/manifest.json")


@pytest.mark.timeout(120)
def test_cache_downloads_each_shard_once_per_node(tiny_shards, tmp_path):
    log, cache = tmp_path / "server.log", tmp_path / "cache"
    with http_server(Path(tiny_shards), log) as (url, _):
        reference = train(tiny_shards, epoch=0)
        for epoch in range(2):      # two workers per epoch, each reading every shard it needs
            got = train(url, epoch=epoch, num_workers=2, cache_dir=cache, window_images=16)
            assert same(got, reference) if epoch == 0 else len(got) == len(reference)
        list(eval_batches(ShardSource(url, cache_dir=str(cache)), "query", batch_size=64, image_size=SIZE))
    manifest = load_manifest(tiny_shards)
    train_names = [e["name"] for e in manifest["splits"]["train"]["shards"]]
    counts = gets(log)
    assert {n: counts[n] for n in train_names} == {n: 1 for n in train_names}, counts
    assert counts["query-000000.tar"] == 1
    by_sha = {e["sha256"] for s in ("train", "query") for e in manifest["splits"][s]["shards"]}
    assert {p.name for p in cache.glob("*.tar")} == {f"{sha}.tar" for sha in by_sha}
    assert not list(cache.glob(".*.tmp"))


@pytest.mark.timeout(120)
def test_server_stopped_mid_epoch_fails_naming_the_url_in_bounded_time(tiny_shards, tmp_path):
    log = tmp_path / "server.log"
    with http_server(Path(tiny_shards), log) as (url, proc):
        # small windows: later steps read shards again, after the server is gone
        batches = iter(train_batches(url, p=2, k=2, rank=0, world_size=1, epoch=0, image_size=SIZE,
                                     window_images=8, io_attempts=4))
        next(batches)
        proc.kill()
        proc.wait()
        started = time.monotonic()
        with pytest.raises(ShardError, match=rf"{re.escape(url)}\S+\.tar unreachable: 4 attempts"):
            for _ in batches:
                pass
    assert time.monotonic() - started < 30      # back-off 0.5 + 1 + 2 s, then the error


@pytest.mark.timeout(60)
def test_a_silent_server_times_out_instead_of_hanging(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []

    def accept():          # accepts and never answers
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/shards/"
    started = time.monotonic()
    try:
        with pytest.raises(ShardError, match=rf"{re.escape(url)}manifest.json"):
            load_manifest(ShardSource(url, timeout_s=1.0, attempts=2))
    finally:
        listener.close()
        for conn in held:
            conn.close()
    assert time.monotonic() - started < 10


@pytest.mark.timeout(90)
def test_missing_modified_and_failing_remote_shards_are_errors_naming_the_url(tiny_shards, tmp_path):
    manifest = load_manifest(tiny_shards)
    name, sha = (manifest["splits"]["train"]["shards"][1][key] for key in ("name", "sha256"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_shards, broken)
    data = bytearray((broken / name).read_bytes())
    data[2000] ^= 0xFF                                       # inside the first image's bytes
    (broken / name).write_bytes(bytes(data))
    with http_server(broken, tmp_path / "server.log") as (url, _):
        with pytest.raises(ShardError, match=rf"{re.escape(url + name)}: sha256"):
            train(url)
        assert train(url, verify=False)                      # the bytes are fine as a tar
        with pytest.raises(ShardError, match=rf"{re.escape(url + name)}: sha256"):
            train(url, cache_dir=tmp_path / "cache")
        assert not (tmp_path / "cache" / f"{sha}.tar").exists()   # a bad download never enters the cache
        assert not list((tmp_path / "cache").glob(".*.tmp"))
        (broken / name).unlink()
        started = time.monotonic()
        with pytest.raises(ShardError, match=rf"{re.escape(url + name)}: HTTP 404"):
            train(url, verify=False)
        assert time.monotonic() - started < 5                # a missing file is not retried
    with pytest.raises(ShardError, match=r"pipe:false \{name\}|pipe:false manifest.json"):
        load_manifest(ShardSource("pipe:false {name}", attempts=2))


def node_cmd(port: int, url: str, cache: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"http-{port}",
            "--max-restarts", "0", "--monitor-interval", "0.5",
            str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/test.yaml"),
            f"data.shards={url}", f"data.cache_dir={cache}", f"output_dir={out}", "tracking.enabled=false",
            "train.epochs=2", "train.steps_per_epoch=3", "data.num_workers=1"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_nodes_train_from_http_shards_through_one_cache(tiny_shards, tmp_path):
    served = tmp_path / "served"            # the only copy the trainers can reach is over HTTP
    shutil.copytree(tiny_shards, served)
    log, cache, out = tmp_path / "server.log", tmp_path / "cache", tmp_path / "run"
    env = dict(__import__("os").environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    nodes = []
    with http_server(served, log) as (url, _):
        port = free_port()
        try:
            for n in range(2):
                with open(tmp_path / f"node{n}.log", "wb") as fh:
                    nodes.append(subprocess.Popen(node_cmd(port, url, cache, out), cwd=ROOT, env=env, stdout=fh,
                                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
                if n == 0:
                    deadline = time.monotonic() + 60
                    while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
                        assert time.monotonic() < deadline and nodes[0].poll() is None
                        time.sleep(0.2)
            codes = [node.wait(timeout=240) for node in nodes]
        finally:
            for node in nodes:
                if node.poll() is None:
                    node.kill()
    logs = "\n".join((tmp_path / f"node{n}.log").read_text(errors="replace")[-3000:] for n in range(2))
    assert codes == [0, 0], logs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_completed"] == 2, summary
    manifest = load_manifest(served)
    shards = [e for s in manifest["splits"].values() for e in s["shards"]]
    counts = gets(log)
    read = [e for e in shards if counts[e["name"]]]
    assert {e["name"] for e in manifest["splits"]["train"]["shards"]} <= {e["name"] for e in read}
    assert all(counts[e["name"]] == 1 for e in read), counts              # once for both "nodes"
    assert sorted(p.name for p in cache.glob("*.tar")) == sorted(f"{e['sha256']}.tar" for e in read)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_training_run_whose_server_dies_fails_naming_the_url(tiny_shards, tmp_path):
    """The trainer's view: the server goes away after the first steps; the next epoch's reads are
    retried, then the run exits non-zero with the shard's URL in its output, in bounded time."""
    out, log = tmp_path / "run", tmp_path / "train.log"
    env = dict(__import__("os").environ, OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    with http_server(Path(tiny_shards), tmp_path / "server.log") as (url, server):
        with open(log, "wb") as fh:
            proc = subprocess.Popen([sys.executable, str(ROOT / "launch/train.py"), "--config",
                                     str(ROOT / "configs/test.yaml"), f"data.shards={url}", f"output_dir={out}",
                                     "tracking.enabled=false", "train.epochs=3", "train.steps_per_epoch=3"],
                                    cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 150
            while not (out / "train_log.jsonl").is_file() or not (out / "train_log.jsonl").read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            server.kill()
            started = time.monotonic()
            code = proc.wait(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text(errors="replace")
    assert code != 0 and time.monotonic() - started < 60
    assert re.search(rf"{re.escape(url)}\S+\.tar unreachable: 5 attempts", text), text[-3000:]
