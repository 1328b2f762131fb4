"""The trained network as an MLflow model: logged by a real Tracker into a real sqlite store, loaded
with mlflow.pyfunc, by FeatureExtractor, and served over HTTP by `mlflow models serve`.

The network is a ResNet-18 AlignedReID at 64x32 with non-trivial BatchNorm statistics (a fresh
network's would make eval-mode BN an identity and hide preprocessing mistakes).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlflow.artifacts
import mlflow.pyfunc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from PIL import Image

from gloo_ranks import free_port
from pipeline.config import Config, ConfigError, TrackingConfig, load_config
from pipeline.data.transforms import normalize
from pipeline.inference import FeatureExtractor
from pipeline.model import AlignedReID, MutualPair, build_model
from pipeline.serving import eval_state_dict, locate_model, save_pyfunc_model
from pipeline.tracking import Tracker

IMAGE_SIZE = (64, 32)
NUM_CLASSES = 7
REGISTERED = "reid-test"
# Variables the Tracker sets in its process, and the one these tests set: restored after each use.
_ENV = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_TRACKING_URI")


def make_config() -> Config:
    cfg = Config()
    cfg.model.backbone, cfg.model.last_stride, cfg.data.image_size = "resnet18", 2, list(IMAGE_SIZE)
    return cfg


def make_network(cfg: Config, seed: int = 0) -> AlignedReID:
    torch.manual_seed(seed)
    model = build_model(cfg.model, NUM_CLASSES)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def images(n: int, size=IMAGE_SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *size, 3), dtype=np.uint8)


def log_run(uri: str, out: Path, weights: dict, cfg: Config, **tracking) -> str:
    """One tracked run that logs the model; returns its run id."""
    saved = {name: os.environ.get(name) for name in _ENV[:2]}
    tracker = Tracker(TrackingConfig(uri=uri, experiment="serving", timeout_s=60, **tracking),
                      is_main=True, output_dir=out)
    try:
        run_id = tracker.start(cfg.flat(), {})
        tracker.log_metrics({"eval/mAP": 0.5}, step=12)
        tracker.log_model(weights, cfg.to_dict(), NUM_CLASSES)
        tracker.finish("FINISHED")
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
    return run_id


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> SimpleNamespace:
    """A run in a fresh sqlite store with the logged model, registered as REGISTERED."""
    tmp = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    # Artifacts under tmp (the default would be ./mlruns in the working directory).
    client.create_experiment("serving", artifact_location=(tmp / "artifacts").as_uri())
    cfg = make_config()
    net = make_network(cfg)
    run_id = log_run(uri, tmp / "out", eval_state_dict(net), cfg, register_as=REGISTERED)
    return SimpleNamespace(tmp=tmp, uri=uri, client=client, run_id=run_id, net=net, cfg=cfg)


@pytest.fixture
def tracking_env(logged, monkeypatch):
    """MLFLOW_TRACKING_URI pointing at the test store, as a user would set it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged.uri)
    return logged.uri


def reference(net: AlignedReID, batch: np.ndarray) -> np.ndarray:
    """The network's own eval output, L2-normalised, for images already at the trained size."""
    with torch.no_grad():
        x = normalize(torch.from_numpy(batch).permute(0, 3, 1, 2))
        return F.normalize(net(x), dim=1).numpy()


# --------------------------------------------------------------------------------------------------
# The logged model
# --------------------------------------------------------------------------------------------------
def test_logged_model_is_listed_and_linked_to_the_run(logged, tracking_env):
    run = logged.client.get_run(logged.run_id)
    (model,) = [m for m in logged.client.search_logged_models([run.info.experiment_id])
                if m.source_run_id == logged.run_id]
    assert (model.name, model.status) == ("model", LoggedModelStatus.READY)
    assert model.params["num_classes"] == str(NUM_CLASSES) and model.params["feature_dim"] == "512"
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(model.model_id, 12)]
    files = {a.path for a in logged.client.list_logged_model_artifacts(model.model_id)}
    assert {"MLmodel", "artifacts", "code", "serving_model.py"} <= files
    # Through runs:/ (MLflow 3.17 resolves that with the process-wide tracking URI: tracking_env).
    listed = {a.path for a in logged.client.list_artifacts(logged.run_id, "model")}
    assert {f"model/{name}" for name in files} == listed
    assert "model" not in {a.path for a in logged.client.list_artifacts(logged.run_id)}   # not a run artifact


def test_pyfunc_predict_equals_feature_extractor_and_network(logged, tracking_env):
    loaded = mlflow.pyfunc.load_model(f"runs:/{logged.run_id}/model")
    assert loaded.metadata.run_id == logged.run_id and loaded.metadata.model_id.startswith("m-")
    signature = loaded.metadata.signature
    (spec_in,), (spec_out,) = signature.inputs.inputs, signature.outputs.inputs
    assert (spec_in.type, spec_in.shape) == (np.dtype(np.uint8), (-1, -1, -1, 3))
    assert (spec_out.type, spec_out.shape) == (np.dtype(np.float32), (-1, 512))

    extractor = FeatureExtractor(f"runs:/{logged.run_id}/model")
    assert extractor.image_size == IMAGE_SIZE and extractor.checkpoint == f"runs:/{logged.run_id}/model"
    batch = images(4)
    served = loaded.predict(batch)
    assert served.dtype == np.float32 and served.shape == (4, 512)
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(served, reference(logged.net, batch), atol=1e-5)
    np.testing.assert_allclose(served, extractor(torch.from_numpy(batch).permute(0, 3, 1, 2)).numpy(),
                               atol=1e-6)
    np.testing.assert_allclose(served, extractor([Image.fromarray(a) for a in batch]).numpy(), atol=1e-5)
    assert float(np.abs(served[0] - served[1]).max()) > 1e-3      # the network really runs

    # Other sizes are resized exactly as FeatureExtractor resizes tensors.
    other = images(3, size=(100, 45), seed=1)
    np.testing.assert_allclose(loaded.predict(other),
                               extractor(torch.from_numpy(other).permute(0, 3, 1, 2)).numpy(), atol=1e-6)
    assert loaded.predict(other[:0]).shape == (0, 512)
    with pytest.raises(Exception, match="uint8"):
        loaded.predict(other.astype(np.float32))

    # The PythonModel behind the signature converts with FeatureExtractor's one function
    # (pipeline.inference.images.image_batch): every form the extractor takes, the same features.
    python_model = loaded.unwrap_python_model()
    paths = []
    for i, array in enumerate(batch[:2]):
        paths.append(logged.tmp / f"predict-{i}.png")
        Image.fromarray(array).save(paths[-1])
    expected = served[:2]
    for form in (batch[:2], list(batch[:2]), batch[0], [Image.fromarray(a) for a in batch[:2]], paths,
                 torch.from_numpy(batch[:2]).permute(0, 3, 1, 2), [torch.from_numpy(a).permute(2, 0, 1)
                                                                   for a in batch[:2]]):
        got = python_model.predict(None, form)
        np.testing.assert_allclose(got, expected[:len(got)], atol=1e-5)
        np.testing.assert_allclose(extractor(form).numpy(), got, atol=1e-6)


def test_saved_model_holds_no_pickle(logged, tracking_env):
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{logged.run_id}/model",
                                                     dst_path=str(logged.tmp / "download-pickles")))
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert "artifacts/weights.pt" in files and "MLmodel" in files
    for name in files:
        path = local / name
        if name.endswith(".pt"):
            assert name == "artifacts/weights.pt"
            weights = torch.load(path, weights_only=True)
            assert isinstance(weights, dict) and all(isinstance(v, torch.Tensor) for v in weights.values())
            assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}
            for key, value in logged.net.state_dict().items():
                assert torch.equal(weights[key], value), key
        else:
            assert Path(name).suffix in {".py", ".yaml", ".json", ".txt", ""}, name
            path.read_text(encoding="utf-8")                 # text, not a binary (pickle) stream
    assert not [n for n in files if "pkl" in n or "pickle" in n or "__pycache__" in n]
    pyfunc = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "python_model" not in pyfunc
    config = yaml.safe_load((local / "artifacts/config.yaml").read_text())
    assert config["model"]["backbone"] == "resnet18" and config["data"]["image_size"] == list(IMAGE_SIZE)
    assert json.loads((local / "artifacts/info.json").read_text())["num_classes"] == NUM_CLASSES
    requirements = (local / "requirements.txt").read_text().split()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements
    assert {"pyyaml", "numpy", "pillow"} <= set(requirements)


def test_feature_extractor_takes_uris_and_model_dirs(logged, tracking_env, monkeypatch):
    batch = torch.from_numpy(images(2)).permute(0, 3, 1, 2)
    expected = reference(logged.net, images(2))
    local = mlflow.artifacts.download_artifacts(f"runs:/{logged.run_id}/model",
                                                dst_path=str(logged.tmp / "download-dir"))
    extractors = [FeatureExtractor(source) for source in (f"runs:/{logged.run_id}/model",
                                                          f"models:/{REGISTERED}/1", local, Path(local))]
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    extractors.append(FeatureExtractor(f"runs:/{logged.run_id}/model", tracking_uri=logged.uri))
    for extractor in extractors:
        assert extractor.info["num_classes"] == NUM_CLASSES and extractor.info["mutual"] is False
        np.testing.assert_allclose(extractor(batch).numpy(), expected, atol=1e-5,
                                   err_msg=str(extractor.checkpoint))


def test_register_as_adds_a_version_per_run(logged):
    client = logged.client
    (first,) = client.search_model_versions(f"name = '{REGISTERED}'")
    (model,) = client.search_logged_models([client.get_run(logged.run_id).info.experiment_id],
                                           filter_string=f"source_run_id = '{logged.run_id}'")
    model_id = model.model_id
    assert (str(first.version), first.run_id, first.source) == ("1", logged.run_id, model.artifact_location)
    assert json.loads(client.get_logged_model(model_id).tags["mlflow.modelVersions"]) == [
        {"name": REGISTERED, "version": "1"}]
    # A second training run registers version 2, of its own model.
    other = make_network(logged.cfg, seed=1)
    pair = MutualPair(other, make_network(logged.cfg))
    second_run = log_run(logged.uri, logged.tmp / "out2", eval_state_dict(pair), logged.cfg,
                         register_as=REGISTERED)
    assert client.get_registered_model(REGISTERED).name == REGISTERED
    versions = {str(v.version): v.run_id for v in client.search_model_versions(f"name = '{REGISTERED}'")}
    assert versions == {"1": logged.run_id, "2": second_run}
    extractor = FeatureExtractor(f"models:/{REGISTERED}/2", tracking_uri=logged.uri)
    np.testing.assert_allclose(extractor(torch.from_numpy(images(2)).permute(0, 3, 1, 2)).numpy(),
                               reference(other, images(2)), atol=1e-5)     # nets[0] of the pair


def test_register_as_is_validated():
    assert load_config(None).tracking.register_as is None
    assert load_config(None, ["tracking.register_as=market-reid"]).tracking.register_as == "market-reid"
    for bad in ("''", "' x'", "3"):
        with pytest.raises(ConfigError, match="tracking.register_as"):
            load_config(None, [f"tracking.register_as={bad}"])
    with pytest.raises(ConfigError, match="tracking.log_model is false"):
        load_config(None, ["tracking.register_as=x", "tracking.log_model=false"])


class Wrapped(torch.nn.Module):
    """What DDP and a DeepSpeed engine look like from outside: the network as `.module`."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module


def test_eval_state_dict_strips_wrappers():
    cfg = make_config()
    net = make_network(cfg)
    weights = eval_state_dict(Wrapped(MutualPair(net.bfloat16().float(), make_network(cfg, 1))))
    assert weights.keys() == net.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items())
    weights["neck.weight"].add_(1.0)                                  # copies, not views
    assert not torch.equal(weights["neck.weight"], net.state_dict()["neck.weight"])


# --------------------------------------------------------------------------------------------------
# Errors name what is wrong
# --------------------------------------------------------------------------------------------------
def test_mismatched_or_wrong_inputs_are_refused_at_log_time(tmp_path):
    cfg = make_config()
    narrow = AlignedReID(NUM_CLASSES, backbone="resnet18", last_stride=2, width=8)
    with pytest.raises(ValueError, match="shape mismatches .*backbone.conv1.weight"):
        save_pyfunc_model(tmp_path / "a", narrow.state_dict(), cfg.to_dict(), NUM_CLASSES)
    with pytest.raises(ValueError, match="num_classes"):
        save_pyfunc_model(tmp_path / "b", make_network(cfg).state_dict(), cfg.to_dict(), 0)
    with pytest.raises(TypeError, match="state dict"):
        save_pyfunc_model(tmp_path / "c", make_network(cfg), cfg.to_dict(), NUM_CLASSES)
    with pytest.raises(ValueError, match="'model' section"):
        save_pyfunc_model(tmp_path / "d", make_network(cfg).state_dict(), {"data": {}}, NUM_CLASSES)
    assert not any((tmp_path / name).exists() and any((tmp_path / name).iterdir()) for name in "abcd")


def test_uri_errors_are_named(logged, tmp_path):
    """With an explicit tracking_uri, and no $MLFLOW_TRACKING_URI."""
    with pytest.raises(FileNotFoundError, match="runs:/0123456789abcdef0123456789abcdef/model"):
        FeatureExtractor("runs:/0123456789abcdef0123456789abcdef/model", tracking_uri=logged.uri)
    # A run whose 'model' is some other MLflow model: no weights file.
    client = logged.client
    run_id = client.create_run(client.get_experiment_by_name("serving").experiment_id).info.run_id
    foreign = tmp_path / "model"
    foreign.mkdir()
    (foreign / "MLmodel").write_text(yaml.safe_dump({"flavors": {"python_function": {
        "loader_module": "mlflow.sklearn", "python_model": "python_model.pkl"}}}))
    client.log_artifacts(run_id, str(foreign), "model")
    with pytest.raises(ValueError, match=r"lacks the \['weights', 'config', 'info'\] artifact"):
        FeatureExtractor(f"runs:/{run_id}/model", tracking_uri=logged.uri)
    # A local copy that lost its weights.
    local = Path(mlflow.artifacts.download_artifacts(locate_model(f"runs:/{logged.run_id}/model", client),
                                                     dst_path=str(tmp_path / "dl")))
    (local / "artifacts/weights.pt").unlink()
    with pytest.raises(FileNotFoundError, match="weights file artifacts/weights.pt is missing"):
        FeatureExtractor(local)


@pytest.mark.timeout(120)
def test_model_goes_to_the_fallback_store_when_the_server_is_down(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"                  # nobody listens there
    cfg = make_config()
    net = make_network(cfg)
    out = tmp_path / "out"
    saved = {name: os.environ.get(name) for name in _ENV[:2]}
    tracker = Tracker(TrackingConfig(uri=dead, experiment="serving", timeout_s=1.0, register_as=REGISTERED),
                      is_main=True, output_dir=out)
    try:
        assert tracker.start(cfg.flat(), {}) is None
        tracker.log_model(eval_state_dict(net), cfg.to_dict(), NUM_CLASSES)
        tracker.finish("FINISHED")
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
    assert tracker.fallback_uri is not None
    client = MlflowClient(tracking_uri=tracker.fallback_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("serving").experiment_id])
    (model,) = client.search_logged_models([run.info.experiment_id])
    assert (model.name, model.source_run_id) == ("model", run.info.run_id)
    assert str(Path(model.artifact_location.removeprefix("file://"))).startswith(str(out.resolve()))
    assert client.search_model_versions(f"name = '{REGISTERED}'")[0].run_id == run.info.run_id
    extractor = FeatureExtractor(f"runs:/{run.info.run_id}/model", tracking_uri=tracker.fallback_uri)
    np.testing.assert_allclose(extractor(torch.from_numpy(images(2)).permute(0, 3, 1, 2)).numpy(),
                               reference(net, images(2)), atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Another process: the model's own code, and `mlflow models serve`
# --------------------------------------------------------------------------------------------------
def _clean_env(uri: str) -> dict[str, str]:
    """No PYTHONPATH (the model must bring its code), the venv's scripts on PATH (the scoring server
    is started as `uvicorn`), the test store as the tracking URI."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS="1", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    return env


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_model_loads_with_its_own_code(logged, tmp_path):
    """In a fresh interpreter without this checkout on the path, the model imports the copy of the
    package that it carries (code_paths)."""
    script = ("import sys, numpy as np, mlflow.pyfunc\n"
              "m = mlflow.pyfunc.load_model(sys.argv[1])\n"
              "out = m.predict(np.load(sys.argv[2]))\n"
              "import pipeline.serving\n"
              "np.save(sys.argv[3], out)\n"
              "print(pipeline.serving.__file__)\n")
    np.save(tmp_path / "in.npy", images(2))
    proc = subprocess.run([sys.executable, "-c", script, f"runs:/{logged.run_id}/model",
                           str(tmp_path / "in.npy"), str(tmp_path / "out.npy")],
                          cwd=tmp_path, env=_clean_env(logged.uri), capture_output=True, text=True,
                          timeout=100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded_from = Path(proc.stdout.strip().splitlines()[-1])
    assert loaded_from.parts[-3:] == ("code", "pipeline", "serving.py"), loaded_from
    assert Path(__file__).resolve().parents[1] not in loaded_from.parents      # not this checkout
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), reference(logged.net, images(2)), atol=1e-5)


def _post(url: str, payload: dict, timeout: float = 30) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_mlflow_models_serve_answers_with_the_same_embeddings(logged, tracking_env, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{logged.run_id}/model",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path, env=_clean_env(logged.uri), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while True:
            assert server.poll() is None, f"the server exited ({server.returncode}):\n" \
                                          f"{(tmp_path / 'serve.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
        batch = images(3, size=(80, 40), seed=2)
        expected = mlflow.pyfunc.load_model(f"runs:/{logged.run_id}/model").predict(batch)
        answer = _post(f"{base}/invocations", {"inputs": batch.tolist()})
        np.testing.assert_allclose(np.asarray(answer["predictions"], dtype=np.float32), expected, atol=1e-5)
        with pytest.raises(urllib.error.HTTPError) as refused:       # 300 is not a uint8 value
            _post(f"{base}/invocations", {"inputs": [[[[1, 2, 300]]]]})
        assert refused.value.code == 400
    finally:
        # The server and its uvicorn child form their own process group: end both.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(server.pid, sig)
                server.wait(timeout=20)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()
