"""Inference API and ONNX export, from a real engine checkpoint (written by CheckpointManager)."""
from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from pipeline.config import Config
from pipeline.checkpoint import CheckpointManager
from pipeline.inference import FeatureExtractor, export_onnx, resolve_checkpoint
from pipeline.model import build_model

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = (64, 32)


def write_checkpoint(run_dir: Path) -> Path:
    """A ResNet-18 checkpoint in the engine's format, with non-trivial BatchNorm statistics (a fresh
    network's would make eval-mode BN an identity and hide preprocessing mistakes less well)."""
    cfg = Config()
    cfg.model.backbone, cfg.model.last_stride, cfg.data.image_size = "resnet18", 2, list(IMAGE_SIZE)
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=7)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    state = {"model": model.state_dict(), "config": cfg.to_dict(), "num_classes": 7, "mutual": False,
             "epoch": 2, "global_step": 40}
    return CheckpointManager(run_dir / "checkpoints").save(state, "ckpt-E0002-S000040.pt")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def extractor(checkpoint) -> FeatureExtractor:
    return FeatureExtractor(checkpoint.parent.parent)       # a run directory resolves to latest


def test_resolves_file_checkpoints_dir_and_run_dir(checkpoint, tmp_path):
    for path in (checkpoint, checkpoint.parent, checkpoint.parent.parent):
        assert resolve_checkpoint(path) == checkpoint
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        resolve_checkpoint(tmp_path)


def test_input_forms_agree_and_features_are_normalised(extractor, tmp_path):
    assert extractor.image_size == IMAGE_SIZE                 # read from the checkpoint's config
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (*IMAGE_SIZE, 3), dtype=np.uint8) for _ in range(3)]
    paths = []
    for i, array in enumerate(arrays):
        paths.append(tmp_path / f"img{i}.png")              # lossless, so every form sees equal pixels
        Image.fromarray(array).save(paths[-1])
    chw = [torch.from_numpy(a).permute(2, 0, 1) for a in arrays]
    from_paths = extractor(paths)
    assert from_paths.shape == (3, 512)
    torch.testing.assert_close(from_paths.norm(dim=1), torch.ones(3))
    # Every form image_batch takes (the served model's predict takes the same, tests/test_serving.py):
    # paths, PIL images, H x W x 3 arrays (uint8 or float), 3 x H x W tensors, batches of either.
    for other in (extractor([str(p) for p in paths]), extractor([Image.fromarray(a) for a in arrays]),
                  extractor(arrays), extractor(np.stack(arrays)), extractor([a / 255.0 for a in arrays]),
                  extractor(chw), extractor(torch.stack(chw)), extractor(tuple(chw)),
                  extractor(torch.stack(chw).float() / 255), extractor([c.numpy() for c in chw])):
        torch.testing.assert_close(other, from_paths, atol=1e-5, rtol=1e-5)
    for one in (paths[1], str(paths[1]), Image.fromarray(arrays[1]), arrays[1], chw[1]):
        torch.testing.assert_close(extractor(one), from_paths[1:2], atol=1e-5, rtol=1e-5)
    assert extractor(np.zeros((0, *IMAGE_SIZE, 3), dtype=np.uint8)).shape == (0, 512)
    # Distinct images give distinct features (the network is really run).
    assert float((from_paths[0] - from_paths[1]).abs().max()) > 1e-3


def test_files_match_what_evaluation_extracts(extractor, tiny_dataset, tiny_shards):
    from pipeline.data.datasets import parse_market1501
    from pipeline.evaluation import extract_features

    records = sorted(parse_market1501(tiny_dataset).splits["query"], key=lambda r: r.source)
    ours = extractor([r.path for r in records])
    model = extractor.model.model
    evaluated = extract_features(model, tiny_shards, "query", image_size=IMAGE_SIZE, batch_size=16,
                                 progress=False)
    torch.testing.assert_close(ours, torch.nn.functional.normalize(evaluated["global"], dim=1),
                               atol=1e-5, rtol=1e-5)


def test_bad_inputs_are_named(extractor, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="image 1: cannot read image .*broken.jpg"):
        extractor([torch.zeros(3, 8, 4, dtype=torch.uint8), bad])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        extractor(torch.full((3, 8, 4), 7.0))
    with pytest.raises(ValueError, match=r"H x W x 3 \(numpy\) or 3 x H x W \(tensor\)"):
        extractor(torch.zeros(8, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"image 0: .* got shape \(8, 4, 2\)"):
        extractor(np.zeros((8, 4, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="pixel dtype torch.int32"):
        extractor(np.zeros((8, 4, 3), dtype=np.int32))
    with pytest.raises(TypeError, match="got a dict; expected a file path, a PIL image"):
        extractor({"a": 1})
    with pytest.raises(ValueError, match="no images given"):
        extractor([])


def export_cli(args: list[str]) -> tuple[int, str, str]:
    """launch/export.py's main() in this process (saves an interpreter start)."""
    spec = importlib.util.spec_from_file_location("launch_export", ROOT / "launch" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = module.main(args)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_onnx_export_matches_pytorch(checkpoint, extractor, tmp_path):
    """launch/export.py writes one self-contained file; ONNX Runtime gives the same features for
    several batch sizes (dynamic batch axis)."""
    out = tmp_path / "export" / "model.onnx"
    code, stdout, stderr = export_cli(["--checkpoint", str(checkpoint), "--out", str(out)])
    assert code == 0, stderr[-3000:]
    assert "max |diff|" in stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]   # no temp/external files
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "images" and session.get_outputs()[0].name == "features"
    gen = torch.Generator().manual_seed(1)
    for n in (1, 5):
        images = torch.randint(0, 256, (n, 3, 80, 40), dtype=torch.uint8, generator=gen)
        got = session.run(None, {"images": extractor.preprocess(images).numpy()})[0]
        np.testing.assert_allclose(got, extractor(images).numpy(), atol=1e-5)


def test_export_of_missing_checkpoint_writes_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        export_onnx(tmp_path / "nothing", tmp_path / "m.onnx")
    code, _, err = export_cli(["--checkpoint", str(tmp_path / "nothing"), "--out",
                               str(tmp_path / "m.onnx")])
    assert code == 2 and "export error: no checkpoint at" in err
    assert not (tmp_path / "m.onnx").exists()
