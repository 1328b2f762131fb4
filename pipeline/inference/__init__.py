"""Inference: turn images into re-ID features with a trained network, and export the network to ONNX.

    extractor = FeatureExtractor("outputs/run/checkpoints")       # a file, a checkpoints dir or a run dir
    extractor = FeatureExtractor("runs:/<run_id>/model")          # or models:/NAME/VERSION (MLflow)
    feats = extractor(["a.jpg", "b.jpg"])                        # [2, D], L2-normalised
    similarity = feats @ feats.T                                 # cosine similarity

    sources.py    where the network comes from: an engine checkpoint (pipeline.model.model_from_checkpoint),
                  a logged model's files or directory, an MLflow URI (MLflow is imported only for those)
    images.py     image_batch: the one conversion of every accepted image form (paths, PIL images,
                  H x W x 3 arrays, 3 x H x W tensors, batches) to the network's input; the served
                  model (pipeline.serving) uses it too
    extractor.py  FeatureExtractor, Embedder
    export.py     export_onnx (needs the `export` extra; MissingExtraError names it when absent)

This package sits below pipeline.serving (which wraps FeatureExtractor as the MLflow pyfunc model) and
never imports it: the logged model is *read* here and *written* there.
"""
from pipeline.checkpoint import resolve_checkpoint

from .export import EXPORT_EXTRA, MissingExtraError, export_onnx, require_export_extra
from .extractor import DEFAULT_IMAGE_SIZE, Embedder, FeatureExtractor
from .images import ImageInput, image_batch
from .sources import is_model_uri, load_network, network_from_model_dir, network_from_uri

__all__ = ["DEFAULT_IMAGE_SIZE", "EXPORT_EXTRA", "Embedder", "FeatureExtractor", "ImageInput", "MissingExtraError",
           "export_onnx", "image_batch", "is_model_uri", "load_network", "network_from_model_dir",
           "network_from_uri", "require_export_extra", "resolve_checkpoint"]
