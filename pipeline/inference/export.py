"""ONNX export of the inference network.

The exported graph takes the preprocessed batch `images` [N, 3, H, W] (float32, normalised:
FeatureExtractor.preprocess) and returns `features` [N, D] (L2-normalised), with a dynamic batch axis.
It uses the torch.export-based exporter (``dynamo=True``, the default since torch 2.9; it needs
onnxscript): the older TorchScript exporter also works for this network and is about 4x faster, but
torch 2.13 deprecates it. The exporter and the check with ONNX Runtime need the `export` extra
(`pip install 'alignedreid-pipeline[export]'`): `require_export_extra` says so before any work.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline.fileio import atomic_path

from .extractor import FeatureExtractor

PROJECT = "alignedreid-pipeline"          # pyproject's [project] name
EXPORT_EXTRA = f"pip install '{PROJECT}[export]'"


class MissingExtraError(ImportError):
    """An optional dependency of this entry point is not installed; the message names the extra."""


def require_export_extra(verify: bool = False) -> None:
    """Raise MissingExtraError naming the `export` extra when onnxscript or onnx (and, with `verify`,
    onnxruntime) cannot be imported."""
    missing = []
    for name in ("onnxscript", "onnx") + (("onnxruntime",) if verify else ()):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtraError(f"ONNX export needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                                f"not installed: install the export extra with `{EXPORT_EXTRA}` (in a "
                                f"checkout: pip install -e '.[export]')")


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's notes that do not concern this network (no torchvision ops in it; a
    deprecation inside torch.export), so a real warning stays visible."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def export_onnx(checkpoint: str | Path, out: str | Path, image_size: Sequence[int] | None = None,
                opset: int | None = None) -> Path:
    """Write the inference network (preprocessed images -> L2-normalised features, dynamic batch) as
    ONNX to `out`, atomically. image_size defaults to the checkpoint's training size, opset to the
    exporter's default. The weights are embedded, so the file stands alone (the exporter would
    otherwise write them beside it, under the temporary name). Raises MissingExtraError without the
    export extra."""
    require_export_extra()
    extractor = FeatureExtractor(checkpoint, image_size=image_size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 3, *extractor.image_size)
    with atomic_path(out) as tmp:
        with torch.no_grad(), _quiet_exporter():
            torch.onnx.export(extractor.model, (example,), str(tmp), input_names=["images"],
                              output_names=["features"], opset_version=opset, dynamo=True,
                              dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
                              external_data=False, verbose=False)
    return out
