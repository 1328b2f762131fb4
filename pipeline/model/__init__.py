"""AlignedReID networks: the ResNet trunk (backbone.py: torchvision names, configurable last stride), its
ImageNet weights (pretrained.py), the global and local heads and mutual pairs (aligned.py).
`model_from_checkpoint` (restore.py) rebuilds a trained network from a checkpoint, which it reads with
pipeline.checkpoint (this package may import pipeline.checkpoint; never the reverse)."""
from .aligned import AlignedReID, MutualPair, build_model, convert_sync_bn
from .backbone import ARCHS, IMAGENET_URLS, ResNet
from .pretrained import (LoadReport, PretrainedWeightsError, fetch_pretrained, fetch_pretrained_once_per_node,
                         load_pretrained, pretrained_cache_path)
from .restore import model_from_checkpoint

__all__ = ["ARCHS", "IMAGENET_URLS", "AlignedReID", "LoadReport", "MutualPair", "PretrainedWeightsError", "ResNet",
           "build_model", "convert_sync_bn", "fetch_pretrained", "fetch_pretrained_once_per_node",
           "load_pretrained", "model_from_checkpoint", "pretrained_cache_path"]
