"""AlignedReID networks: the ResNet trunk (torchvision names, configurable last stride), the global and
local heads, mutual pairs, and rebuilding a trained network from a checkpoint."""
from .aligned import AlignedReID, MutualPair, build_model, convert_sync_bn, model_from_checkpoint
from .backbone import ARCHS, LoadReport, ResNet, load_pretrained

__all__ = ["ARCHS", "AlignedReID", "LoadReport", "MutualPair", "ResNet", "build_model", "convert_sync_bn",
           "load_pretrained", "model_from_checkpoint"]
