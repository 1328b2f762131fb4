"""AlignedReID network: a ResNet trunk with a global branch (average pooling, optional BN neck,
identity classifier) and a local branch (stripes pooled over the width, 1x1 conv, BN, ReLU).

Train mode returns everything the losses need; eval mode returns the retrieval features. The local
features at test time go through the same trained conv/BN as in training (one reproduction skipped
them at test time, a train/test mismatch).
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CHOICES, ModelConfig
from .backbone import ResNet
from .pretrained import LoadReport, load_pretrained

log = logging.getLogger(__name__)

LOCAL_HEADS = CHOICES["model.local_head"]   # the one list, kept where the config is validated
LOCAL_BN_INITS = CHOICES["model.local_bn_init"]


def unit_distance_gamma(local_dim: int) -> float:
    """The stripe-BN scale at which two unrelated stripes start a distance 1 apart.

    After BN with scale g (shift 0) each pre-ReLU coordinate is ~N(0, g^2); after the ReLU it has
    variance g^2 (1/2 - 1/(2 pi)). Two independent stripes of `local_dim` coordinates then differ by
    E||f - g||^2 = local_dim * g^2 * (1 - 1/pi). With g = 1 and 128 coordinates that is 9.3, where
    tanh(d / 2) = 0.9998 has slope 2e-4: the local loss has no gradient. At g = 1 / sqrt(local_dim
    (1 - 1/pi)) the distance starts at 1 (tanh slope 0.39); training then pushes different people's
    stripes out towards saturation (where, by the paper's design, they stop pulling on the path) while
    the same person's matched stripes stay on the slope."""
    return 1.0 / ((local_dim * (1.0 - 1.0 / math.pi)) ** 0.5)


class AlignedReID(nn.Module):
    """Train mode: `model(x) -> {"global": [N, D] (pre-neck, for the triplet losses), "local":
    [N, S, local_dim], "logits": [N, num_classes]}`, and "local_logits" [N, S, num_classes] (each
    stripe's identity logits) with `local_id`.
    Eval mode: `model(x) -> [N, D]` (post-neck), `model(x, return_local=True) -> (global, local)`.

    S is the feature-map height: 8 at 256x128 with last_stride 2, 16 with last_stride 1. `width` is the
    trunk's base channel count (64 = torchvision's; smaller only for cheap tests)."""

    def __init__(self, num_classes: int, backbone: str = "resnet50", last_stride: int = 1, neck: bool = True,
                 local_dim: int = 128, stripe_pool: str = "avg", width: int = 64,
                 local_head: str = "pool-conv-bn-relu", local_normalize: bool = False,
                 local_bn_init: str = "unit-distance", local_id: bool = False, local_bn_fixed: bool = False):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes is {num_classes}; the identity classifier needs at least 1")
        if stripe_pool not in ("avg", "max"):
            raise ValueError(f"stripe_pool is {stripe_pool!r}; must be 'avg' or 'max'")
        if local_head not in LOCAL_HEADS:
            raise ValueError(f"local_head is {local_head!r}; must be one of {LOCAL_HEADS}")
        if local_bn_init not in LOCAL_BN_INITS:
            raise ValueError(f"local_bn_init is {local_bn_init!r}; must be one of {LOCAL_BN_INITS}")
        self.backbone = ResNet(backbone, last_stride, width)
        dim = self.backbone.out_channels
        self.feat_dim, self.local_dim, self.stripe_pool = dim, local_dim, stripe_pool
        self.local_head, self.local_normalize = local_head, local_normalize
        # BN neck (as in the strong baselines): the triplet loss sees the raw pooled feature, the
        # classifier and retrieval the normalised one. Its shift stays at zero (frozen) and the
        # classifier has no bias, so the ID loss cannot be lowered by moving the features off-centre.
        self.neck = nn.BatchNorm1d(dim) if neck else None
        if self.neck is not None:
            self.neck.bias.requires_grad_(False)
        self.classifier = nn.Linear(dim, num_classes, bias=not neck)
        nn.init.normal_(self.classifier.weight, std=0.001)
        if self.classifier.bias is not None:
            nn.init.zeros_(self.classifier.bias)
        if local_head in ("pool-conv-bn-relu", "pool-conv-bn"):
            # Reproduction A: pool the map over the width, then 1x1 conv, BN, ReLU on each stripe.
            # pool-conv-bn: no ReLU and a BN without learnt scale and shift, so every stripe dimension
            # stays centred with unit variance over the batch: signed stripes that, once L2-normalised,
            # cannot all collapse onto one direction (the trivial minimum of a batch-hard triplet loss
            # whose hardest negatives are still closer than its hardest positives).
            self.local_conv = nn.Conv2d(dim, local_dim, 1, bias=False)  # BN follows: a bias is redundant
            self.local_bn = nn.BatchNorm2d(local_dim, affine=local_head == "pool-conv-bn-relu")
        else:
            # AlignedReID++: BN and ReLU on the whole map, pool over the width, then a 1x1 conv.
            self.local_bn = nn.BatchNorm2d(dim)
            self.local_conv = nn.Conv2d(dim, local_dim, 1, bias=True)
            nn.init.zeros_(self.local_conv.bias)
        self.local_relu = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.local_conv.weight, mode="fan_out", nonlinearity="relu")
        # The stripe scale: only the reproduction's head ends in a BN scale (the others end in a conv or
        # in a BN without one), so local_bn_init concerns it alone.
        self.local_bn_init = local_bn_init if local_head == "pool-conv-bn-relu" else "one"
        if self.local_bn_init == "uniform":      # PyTorch <= 0.4's BatchNorm default (pytorch#12325)
            nn.init.uniform_(self.local_bn.weight, 0.0, 1.0)
        elif self.local_bn_init == "unit-distance":
            nn.init.constant_(self.local_bn.weight, unit_distance_gamma(local_dim))
        self.local_bn_fixed = local_bn_fixed and local_head == "pool-conv-bn-relu"
        if self.local_bn_fixed:       # the stripes' spread over the batch stays where it started
            self.local_bn.weight.requires_grad_(False)
            self.local_bn.bias.requires_grad_(False)
        # model.local_id: one identity classifier shared by all stripes (a stripe's identity logits),
        # behind a BN neck as the global classifier is: the stripes' scale is the triplet's business
        # (it may shrink them), and the classifier must learn whatever that scale is.
        self.local_neck = self.local_classifier = None
        if local_id:
            self.local_neck = nn.BatchNorm1d(local_dim)
            self.local_neck.bias.requires_grad_(False)
            self.local_classifier = nn.Linear(local_dim, num_classes, bias=False)
            nn.init.normal_(self.local_classifier.weight, std=0.001)

    def _pool(self, fmap: torch.Tensor) -> torch.Tensor:
        return fmap.mean(3, keepdim=True) if self.stripe_pool == "avg" else fmap.amax(3, keepdim=True)

    def local_features(self, fmap: torch.Tensor) -> torch.Tensor:
        """Feature map [N, D, H, W] -> stripes [N, H, local_dim] (unit length each with local_normalize)."""
        if self.local_head == "pool-conv-bn-relu":
            stripes = self.local_relu(self.local_bn(self.local_conv(self._pool(fmap))))
        elif self.local_head == "pool-conv-bn":
            stripes = self.local_bn(self.local_conv(self._pool(fmap)))
        else:
            stripes = self.local_conv(self._pool(self.local_relu(self.local_bn(fmap))))
        stripes = stripes.squeeze(3).transpose(1, 2)
        if self.local_normalize:
            # Unit stripes keep ||f - g|| in [0, 2], where tanh(||f - g|| / 2) has a useful gradient.
            stripes = F.normalize(stripes, dim=2, eps=1e-12)
        return stripes

    def forward(self, x: torch.Tensor, return_local: bool = False):
        fmap = self.backbone(x)
        global_feat = fmap.mean((2, 3))
        neck_feat = global_feat if self.neck is None else self.neck(global_feat)
        if self.training:
            local = self.local_features(fmap)
            out = {"global": global_feat, "local": local, "logits": self.classifier(neck_feat)}
            if self.local_classifier is not None:                            # [N, S, num_classes]
                out["local_logits"] = self.local_classifier(self.local_neck(local.flatten(0, 1))).unflatten(
                    0, local.shape[:2])
            return out
        if return_local:
            return neck_feat, self.local_features(fmap)
        return neck_feat


class MutualPair(nn.Module):
    """Two networks trained together (deep mutual learning) on the same batch. Train mode returns the
    list of both output dicts; eval mode is the first network's eval forward."""

    def __init__(self, net_a: AlignedReID, net_b: AlignedReID):
        super().__init__()
        self.nets = nn.ModuleList([net_a, net_b])

    def forward(self, x: torch.Tensor, return_local: bool = False):
        if self.training:
            return [net(x) for net in self.nets]
        return self.nets[0](x, return_local=return_local)


def build_model(model_cfg: ModelConfig, num_classes: int, cache_dir: str | None = None) -> AlignedReID:
    """The network `model_cfg` describes, with ImageNet weights in the trunk when `model.pretrained` is
    set (path or URL; a URL is downloaded once into `cache_dir`, default the torch hub cache, and its
    sha256 prefix checked, see `fetch_pretrained`). The load report is kept as
    `model.pretrained_report`. SyncBatchNorm is not applied here (it needs the process group
    and GPUs): call `convert_sync_bn` in the multi-GPU set-up."""
    model = AlignedReID(num_classes, backbone=model_cfg.backbone, last_stride=model_cfg.last_stride,
                        neck=model_cfg.neck, local_dim=model_cfg.local_dim, stripe_pool=model_cfg.stripe_pool,
                        local_head=model_cfg.local_head, local_normalize=model_cfg.local_normalize,
                        local_bn_init=model_cfg.local_bn_init, local_id=model_cfg.local_id,
                        local_bn_fixed=model_cfg.local_bn_fixed)
    report: LoadReport | None = None
    if model_cfg.pretrained:
        report = load_pretrained(model.backbone, model_cfg.pretrained, cache_dir)
    model.pretrained_report = report
    return model


def convert_sync_bn(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer by SyncBatchNorm (statistics over all ranks' batches; GPU only)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
