"""Tracker and comparison against a real `mlflow server` process (sqlite backend, 127.0.0.1):
recording over HTTP, comparing runs on a server, and a server that goes away mid-run and comes back.
One server per module: starting one costs several seconds."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.tracking.compare import compare_runs
from pipeline.config import Config, TrackingConfig
from pipeline.tracking import Tracker

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1 in its own process group (it forks uvicorn workers)."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
               "--artifacts-destination", str(self.root / "artifacts")]
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        else:
            self.stop()
            raise RuntimeError(f"mlflow server not up in {timeout}s: {(self.root / 'server.log').read_text()[-3000:]}")
        # The first API call of a fresh server is slow (lazy imports): make it here, not in a test.
        url = f"{self.uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
        with urllib.request.urlopen(url, timeout=max(1.0, deadline - time.monotonic())) as r:
            assert r.status == 200

    def freeze(self) -> None:
        """Hang every server process: connections are still accepted, nothing is answered."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.thaw()
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(autouse=True)
def _restore_env(monkeypatch):
    """The Tracker sets MLflow's HTTP retry/timeout variables in its process: undo that after each test."""
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)


def tracker(server, tmp_path, experiment, run_name=None, timeout_s=10.0) -> Tracker:
    cfg = TrackingConfig(uri=server.uri, experiment=experiment, run_name=run_name, timeout_s=timeout_s)
    return Tracker(cfg, is_main=True, output_dir=tmp_path / (run_name or "out"))


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.mark.timeout(120)
def test_records_over_http(server, tmp_path):
    t = tracker(server, tmp_path, "http", "over-http")
    run_id = t.start(Config().flat(), {"world_size": "1"})
    assert run_id is not None
    for step in range(1, 31):
        t.log_metrics({"loss/total": 1.0 / step, "lr": 2e-4}, step=step)
    plot = tmp_path / "cmc.png"
    plot.write_bytes(b"\x89PNG fake")
    t.log_artifact(plot, artifact_path="plots")
    t.log_metrics({"eval/mAP": 0.42}, step=30)
    t.finish("FINISHED")

    client = MlflowClient(tracking_uri=server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "over-http"
    assert len(run.data.params) == len(Config().flat())
    assert steps(client, run_id, "loss/total") == list(range(1, 31))
    assert run.data.metrics["eval/mAP"] == pytest.approx(0.42)
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/cmc.png"]
    assert (server.root / "artifacts").is_dir()                 # proxied through the server
    assert t.fallback_uri is None and not (tmp_path / "over-http/tracking/fallback.db").exists()


@pytest.mark.timeout(120)
def test_compare_on_a_server(server, tmp_path):
    for name, lr, mAP in (("lr-small", 1e-4, 0.3), ("lr-big", 1e-3, 0.5)):
        cfg = Config()
        cfg.train.lr = lr
        t = tracker(server, tmp_path, "compare-http", name)
        t.start(cfg.flat(), {})
        for step in range(3):
            t.log_metrics({"loss/total": mAP / (step + 1), "throughput/images_per_s": 50.0}, step=step)
        t.log_metrics({"eval/mAP": mAP}, step=3)
        t.finish("FINISHED")
    result = compare_runs("compare-http", tracking_uri=server.uri, out_dir=tmp_path / "cmp")
    assert result.differing_params == ["train.lr"]
    assert [r[0] for r in result.rows] == ["lr-big", "lr-small"]
    assert all(p.stat().st_size > 0 for p in result.files)


@pytest.mark.timeout(120)
def test_server_hangs_mid_run_and_comes_back(server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.tracking")
    t = tracker(server, tmp_path, "outage", "outage", timeout_s=5.0)
    run_id = t.start(Config().flat(), {})
    client = MlflowClient(tracking_uri=server.uri)
    for step in range(10):
        t.log_metrics({"loss/total": 1.0}, step=step)
    deadline = time.monotonic() + 30
    while len(steps(client, run_id, "loss/total")) < 10:      # the first part has arrived
        assert time.monotonic() < deadline
        time.sleep(0.2)

    server.freeze()
    try:
        for step in range(10, 30):
            t0 = time.monotonic()
            t.log_metrics({"loss/total": 0.5}, step=step)
            assert time.monotonic() - t0 < 0.5                 # training never waits for the server
            time.sleep(0.05)
        deadline = time.monotonic() + 30
        while not any("not answering" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "no warning about the hung server"
            time.sleep(0.1)
        for step in range(30, 40):
            t.log_metrics({"loss/total": 0.25}, step=step)
    finally:
        server.thaw()

    t.finish("FINISHED")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "pipeline.tracking"]
    assert len(warnings) == 1 and "not answering" in warnings[0].getMessage()
    assert any("answers again" in r.getMessage() for r in caplog.records)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run_id, "loss/total")
    # A request that timed out may still have been applied when the server woke up; the retry of the
    # same metrics (same key, step, timestamp, value) is absorbed by the store, so nothing is doubled.
    assert sorted(m.step for m in history) == list(range(40))
    assert {m.value for m in history if m.step >= 30} == {0.25}
    assert t.fallback_uri is None
