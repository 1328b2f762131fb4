"""ImageNet weights from a URL, against a real HTTP server on 127.0.0.1 (no mocks, no internet).

The server hands out a generated state dict with torchvision's names, saved under a torchvision-style
name (`resnet18-<first 8 hex digits of its sha256>.pth`); TORCH_HOME points into tmp_path, so the hub
cache is `tmp_path/torch_home/hub/checkpoints`.

- first use downloads into the hub cache and loads the file's weights; later uses read the cache
  without a request, checking its hash every time;
- a cached file modified afterwards, and a served file whose hash differs from its name, are refused,
  the latter leaving nothing in the cache; a transfer cut short is retried and never cached; the file
  appears under its final name only once complete;
- a URL without a hash prefix loads with a warning; `#sha256=<hex>` checks one explicitly;
- a closed port or a server that never answers ends in PretrainedWeightsError (URL, cache path, the
  two ways out) within a bounded time;
- under 2 gloo ranks on one node, one download; a failure stops both ranks with the same error;
- `launch/train.py` with an unreachable URL exits 2 with that message, before any training step;
  under torchrun with 2 ranks, rank 0 alone prints it and its exit 2 is the root cause;
- every dataset recipe points at torchvision's ImageNet weights of its own backbone.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from gloo_ranks import free_port, run_ranks
from pipeline.config import load_config
from pipeline.model import (IMAGENET_URLS, PretrainedWeightsError, ResNet, fetch_pretrained,
                            fetch_pretrained_once_per_node, load_pretrained, pretrained_cache_path)

ROOT = Path(__file__).resolve().parents[1]


class WeightsServer:
    """A threaded HTTP server on 127.0.0.1 serving `files` (URL path -> bytes) and recording every
    request path in `requests`. Paths in `cut` send their Content-Length but only half the body, then
    close; paths in `hold` send half, then wait for `release` before sending the rest."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.cut: set[str] = set()
        self.hold: set[str] = set()
        self.release = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                owner.requests.append(self.path)
                body = owner.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path in owner.cut | owner.hold:
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    if self.path in owner.cut:
                        return
                    owner.release.wait(30)
                    body = body[len(body) // 2:]
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = WeightsServer()
    yield srv
    srv.stop()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """TORCH_HOME in tmp_path; returns the hub cache directory the weights must land in."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def weights_file(seed: int = 0) -> tuple[str, bytes, dict[str, torch.Tensor]]:
    """A small torchvision-named resnet18 state dict (width 8) with an ImageNet-style classifier,
    serialised, and its torchvision-style file name."""
    torch.manual_seed(seed)
    state = ResNet("resnet18", width=8).state_dict()
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 64), torch.randn(1000)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    return f"resnet18-{hashlib.sha256(data).hexdigest()[:8]}.pth", data, state


def closed_port_url(name: str = "resnet18-deadbeef.pth") -> str:
    return f"http://127.0.0.1:{free_port()}/{name}"   # free_port binds and closes: nobody listens


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory)) if directory.exists() else []


def assert_loaded(weights: ResNet | dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Every tensor of the trunk (or of its state dict) equals the served file's."""
    weights = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    for key, value in weights.items():
        assert torch.equal(value, state[key]), key


@pytest.mark.timeout(60)
def test_download_once_into_hub_cache_then_reuse_without_network(server, hub_cache) -> None:
    name, data, state = weights_file()
    server.files[f"/models/{name}"] = data
    url = server.url(f"/models/{name}")

    torch.manual_seed(1)
    net = ResNet("resnet18", width=8)
    report = load_pretrained(net, url)
    cached = hub_cache / name
    assert pretrained_cache_path(url) == cached and cached.read_bytes() == data
    assert listing(hub_cache) == [name]                              # no temporary file left behind
    assert report.loaded == sorted(k for k in state if not k.startswith("fc."))
    assert report.ignored == ["fc.weight", "fc.bias"] and not report.missing and not report.unexpected
    assert_loaded(net, state)
    assert server.requests == [f"/models/{name}"]

    server.stop()                                                    # reuse needs no server
    torch.manual_seed(2)
    again = ResNet("resnet18", width=8)
    load_pretrained(again, url)
    assert_loaded(again, state)
    assert fetch_pretrained(url) == cached and server.requests == [f"/models/{name}"]


@pytest.mark.timeout(60)
def test_tampered_cache_is_refused_until_deleted(server, hub_cache) -> None:
    name, data, state = weights_file()
    server.files[f"/{name}"] = data
    url = server.url(f"/{name}")
    cached = fetch_pretrained(url)
    _, other, _ = weights_file(seed=5)
    cached.write_bytes(other)                                        # a valid state dict, but another one
    expected = name.split("-")[1].split(".")[0]
    with pytest.raises(PretrainedWeightsError) as info:
        load_pretrained(ResNet("resnet18", width=8), url)
    message = str(info.value)
    assert str(cached) in message and f"expected {expected}" in message and f"Delete {cached}" in message
    assert len(server.requests) == 1                                 # refused, not silently re-fetched

    cached.unlink()                                                  # the documented way out
    net = ResNet("resnet18", width=8)
    load_pretrained(net, url)
    assert_loaded(net, state)
    assert len(server.requests) == 2


@pytest.mark.timeout(60)
def test_wrong_hash_refused_at_download_and_nothing_cached(server, hub_cache) -> None:
    name, _, _ = weights_file()
    _, other, _ = weights_file(seed=5)
    server.files[f"/{name}"] = other                                 # the name promises another file
    with pytest.raises(PretrainedWeightsError, match=f"does not start with the expected {name[9:17]}; it was "
                                                     f"not cached") as info:
        fetch_pretrained(server.url(f"/{name}"))
    assert str(hub_cache / name) in str(info.value) and "model.pretrained=null" in str(info.value)
    assert listing(hub_cache) == [] and len(server.requests) == 1   # not retried: not a network hiccup


@pytest.mark.timeout(60)
def test_cut_short_transfer_is_retried_and_never_cached(server, hub_cache) -> None:
    name, data, _ = weights_file()
    server.files[f"/{name}"] = data
    server.cut.add(f"/{name}")
    with pytest.raises(PretrainedWeightsError, match=r"cut short: \d+ of \d+ bytes; 2 attempt"):
        fetch_pretrained(server.url(f"/{name}"), attempts=2)
    assert len(server.requests) == 2 and listing(hub_cache) == []

    with pytest.raises(PretrainedWeightsError, match="HTTP 404"):    # a client error is not retried
        fetch_pretrained(server.url("/missing-00000000.pth"))
    assert len(server.requests) == 3


@pytest.mark.timeout(60)
def test_file_appears_under_its_name_only_when_complete(server, hub_cache) -> None:
    name, data, _ = weights_file()
    server.files[f"/{name}"] = data
    server.hold.add(f"/{name}")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(path=fetch_pretrained(server.url(f"/{name}"),
                                                                                 progress=False)))
    thread.start()
    deadline = time.monotonic() + 20
    while not any(n.endswith(".partial") for n in listing(hub_cache)) and time.monotonic() < deadline:
        time.sleep(0.02)
    partial = [n for n in listing(hub_cache) if n.endswith(".partial")]
    assert partial and not (hub_cache / name).exists()               # half received: only a temporary file
    server.release.set()
    thread.join(20)
    assert result["path"] == hub_cache / name and (hub_cache / name).read_bytes() == data
    assert listing(hub_cache) == [name]


@pytest.mark.timeout(60)
def test_url_without_hash_warns_and_sha256_fragment_checks(server, hub_cache, caplog) -> None:
    _, data, state = weights_file()
    digest = hashlib.sha256(data).hexdigest()
    server.files["/plain.pth"] = data
    with caplog.at_level(logging.WARNING, logger="pipeline.model.pretrained"):
        net = ResNet("resnet18", width=8)
        load_pretrained(net, server.url("/plain.pth"))
    assert_loaded(net, state)
    assert "no sha256 prefix" in caplog.text and "cannot be verified" in caplog.text

    server.files["/explicit.pth"] = server.files["/wrong.pth"] = data
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.model.pretrained"):
        assert fetch_pretrained(server.url(f"/explicit.pth#sha256={digest}")) == hub_cache / "explicit.pth"
    assert "cannot be verified" not in caplog.text
    with pytest.raises(PretrainedWeightsError, match="does not start with the expected 00000000"):
        fetch_pretrained(server.url("/wrong.pth#sha256=00000000"))
    with pytest.raises(PretrainedWeightsError, match=r"#sha256=<hex>, with 8 to 64 hex digits"):
        fetch_pretrained(server.url("/wrong.pth#md5=abc"))
    assert listing(hub_cache) == ["explicit.pth", "plain.pth"]


def assert_ways_out(message: str, url: str, cached: Path) -> None:
    assert url in message and str(cached) in message
    assert f"model.pretrained=/path/to/{cached.name}" in message and f"copy the file to {cached}" in message
    assert "model.pretrained=null" in message


@pytest.mark.timeout(60)
def test_unreachable_url_fails_fast_naming_the_ways_out(hub_cache) -> None:
    url = closed_port_url()
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsError) as info:
        fetch_pretrained(url)                                        # defaults: 3 attempts, 1 s + 2 s backoff
    assert time.monotonic() - start < 20
    assert_ways_out(str(info.value), url, hub_cache / "resnet18-deadbeef.pth")
    assert "ConnectionRefusedError" in str(info.value) and "3 attempt(s)" in str(info.value)
    assert listing(hub_cache) == []


@pytest.mark.timeout(60)
def test_server_that_never_answers_times_out(hub_cache) -> None:
    with socket.socket() as silent:                                  # accepts connections, never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/resnet18-deadbeef.pth"
        start = time.monotonic()
        with pytest.raises(PretrainedWeightsError, match="timed out") as info:
            fetch_pretrained(url, timeout_s=0.5, attempts=2)
        assert time.monotonic() - start < 10
    assert_ways_out(str(info.value), url, hub_cache / "resnet18-deadbeef.pth")


def _per_node_worker(rank: int, world: int, out_dir: str, bad_url: str, good_url: str) -> None:
    from pipeline import distributed as D

    info = D.init_distributed("gloo", timeout_s=60)
    result = {}
    try:
        fetch_pretrained_once_per_node(bad_url, info.local_rank, attempts=1, progress=False)
    except PretrainedWeightsError as exc:
        result.update(error=str(exc), all_ranks=exc.all_ranks)
    result["path"] = str(fetch_pretrained_once_per_node(good_url, info.local_rank, progress=False))
    net = ResNet("resnet18", width=8)
    load_pretrained(net, good_url)                                   # what build_model does on every rank
    result["weights"] = net.state_dict()
    D.cleanup()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_one_download_per_node_and_a_failure_stops_every_rank(server, hub_cache, tmp_path) -> None:
    name, data, state = weights_file()
    server.files[f"/{name}"] = data
    bad_url, good_url = closed_port_url(), server.url(f"/{name}")
    out = tmp_path / "ranks"
    out.mkdir()
    results = run_ranks(_per_node_worker, 2, out, bad_url, good_url)
    assert server.requests == [f"/{name}"]                           # local rank 1 waited, then read the cache
    for result in results:
        assert result["all_ranks"] and result["error"] == results[0]["error"]
        assert result["error"].startswith("[rank 0 on ") and bad_url in result["error"]
        assert result["path"] == str(hub_cache / name)
        assert_loaded(result["weights"], state)


def _train(cmd: list[str], tiny_shards: Path, tmp_path: Path, url: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TORCH_HOME=str(tmp_path / "torch_home"),
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    return subprocess.run([*cmd, str(ROOT / "launch/train.py"), "--config", str(ROOT / "configs/test.yaml"),
                           f"data.shards={tiny_shards}", f"output_dir={tmp_path / 'run'}", "tracking.enabled=false",
                           f"model.pretrained={url}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.timeout(150)
def test_train_with_unreachable_weights_exits_2_before_training(tiny_shards, tmp_path) -> None:
    url = closed_port_url()
    proc = _train([sys.executable], tiny_shards, tmp_path, url)
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert "pretrained weights error: model.pretrained: cannot download" in proc.stderr
    assert_ways_out(proc.stderr, url, tmp_path / "torch_home" / "hub" / "checkpoints" / "resnet18-deadbeef.pth")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "train_log.jsonl").exists() and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_torchrun_reports_the_error_once_from_rank_0(tiny_shards, tmp_path) -> None:
    url = closed_port_url()
    proc = _train([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "--monitor-interval", "0.5"], tiny_shards, tmp_path, url)
    assert proc.returncode != 0
    assert proc.stderr.count("pretrained weights error: [rank 0 on ") == 1, proc.stderr[-4000:]
    # torchrun's summary: the root cause is rank 0's clean exit 2 (rank 1 waited, then was stopped).
    root_cause = proc.stderr.split("Root Cause")[-1]
    assert re.search(r"rank\s*: 0 \(local_rank: 0\)\s*exitcode\s*: 2 ", root_cause), proc.stderr[-3000:]
    assert not (tmp_path / "run" / "train_log.jsonl").exists()


@pytest.mark.parametrize("recipe", ["market1501", "dukemtmc", "msmt17", "cuhk03np", "deepspeed_zero2"])
def test_dataset_recipes_start_from_their_backbones_imagenet_weights(recipe: str) -> None:
    cfg = load_config(ROOT / "configs" / f"{recipe}.yaml")
    url = cfg.model.pretrained
    found = re.fullmatch(r"https://download\.pytorch\.org/models/(resnet\d+)-([0-9a-f]{8})\.pth", url or "")
    assert found and found.group(1) == cfg.model.backbone, f"{recipe}: model.pretrained is {url!r}"
    assert url == IMAGENET_URLS[cfg.model.backbone]


def test_demo_and_test_recipes_start_from_scratch() -> None:
    for recipe in ("demo", "test"):
        assert load_config(ROOT / "configs" / f"{recipe}.yaml").model.pretrained is None
