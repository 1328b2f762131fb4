"""ResNet-18/34/50/101 trunks (no pooling, no fc) with a configurable last stride.

Module and parameter names are torchvision's (conv1, bn1, layer1.0.conv1, ..., layerN.0.downsample.0/1;
Bottleneck blocks put the stride on conv2, the "v1.5" variant torchvision ships), so torchvision's
ImageNet state dicts load as they are: `load_pretrained` takes a file path or a URL, drops the
classifier (`fc.*`), refuses shape mismatches and reports missing or unexpected keys.
"""
from __future__ import annotations

import logging
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

# name -> (block type, blocks per stage)
ARCHS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet trunk: image [N, 3, H, W] -> feature map [N, out_channels, H / s, W / s], s = 16 with
    last_stride 1, 32 with last_stride 2. `width` is the channel count of the stem and first stage
    (torchvision: 64); a smaller one gives a cheap network of the same structure and names for tests."""

    def __init__(self, name: str = "resnet50", last_stride: int = 1, width: int = 64):
        super().__init__()
        if name not in ARCHS:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(ARCHS)}")
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride is {last_stride}; must be 1 or 2")
        kind, layers = ARCHS[name]
        block = BasicBlock if kind == "basic" else Bottleneck
        if width < 1:
            raise ValueError(f"width is {width}; must be >= 1")
        self.name = name
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, width, layers[0], 1)
        self.layer2 = self._make_layer(block, 2 * width, layers[1], 2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], 2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], last_stride)
        self.out_channels = 8 * width * block.expansion
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int,
                    stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, None) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


@dataclass
class LoadReport:
    """What `load_pretrained` did: keys copied, backbone keys absent from the file (left at their
    initialisation), file keys with no place in the backbone, and the ImageNet classifier keys dropped."""
    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (f"pretrained weights from {self.source}: {len(self.loaded)} tensors loaded, "
                f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
                f"{len(self.ignored)} classifier keys dropped")
        if self.missing:
            text += f"\n  missing (kept at random init): {', '.join(self.missing)}"
        if self.unexpected:
            text += f"\n  unexpected (not used): {', '.join(self.unexpected)}"
        return text


def _read_state_dict(source: str, cache_dir: str | None) -> dict[str, torch.Tensor]:
    scheme = urllib.parse.urlparse(source).scheme
    if scheme in ("http", "https", "file", "ftp"):
        # Downloaded once into the torch hub cache (or cache_dir), then read from there.
        state = torch.hub.load_state_dict_from_url(source, model_dir=cache_dir, map_location="cpu",
                                                   progress=True, weights_only=True)
    else:
        path = Path(os.path.expanduser(source))
        if not path.is_file():
            raise FileNotFoundError(f"model.pretrained: no file at {path}; give the path or URL of "
                                    f"torchvision-named ImageNet weights (e.g. resnet50-0676ba61.pth), "
                                    f"or set model.pretrained=null to start from random weights")
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"model.pretrained: {source} does not hold a state dict (a mapping of parameter "
                         f"names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_pretrained(backbone: ResNet, source: str, cache_dir: str | None = None) -> LoadReport:
    """Copy torchvision-named ImageNet weights from a file path or URL into `backbone`.

    The classifier (`fc.*`) is dropped. Shape mismatches (usually another depth's weights) are errors;
    no matching key at all is an error (not a torchvision ResNet state dict). Missing and unexpected
    keys are reported in the returned LoadReport and logged as a warning."""
    state = _read_state_dict(source, cache_dir)
    report = LoadReport(source=source)
    own = backbone.state_dict()
    usable: dict[str, torch.Tensor] = {}
    mismatched = []
    for key, value in state.items():
        if key.startswith("fc."):
            report.ignored.append(key)
        elif key not in own:
            report.unexpected.append(key)
        elif value.shape != own[key].shape:
            mismatched.append(f"{key}: file {tuple(value.shape)} vs model {tuple(own[key].shape)}")
        else:
            usable[key] = value
    if mismatched:
        raise ValueError(f"model.pretrained: {source} does not fit backbone {backbone.name}; shape "
                         f"mismatches: {'; '.join(mismatched[:5])}{' ...' if len(mismatched) > 5 else ''}. "
                         f"Use weights of the same depth as model.backbone.")
    if not usable:
        raise ValueError(f"model.pretrained: {source} has no key of a torchvision {backbone.name} (first "
                         f"keys: {', '.join(list(state)[:5])}); expected names like conv1.weight, "
                         f"layer1.0.conv1.weight")
    backbone.load_state_dict(usable, strict=False)
    report.loaded = sorted(usable)
    # BatchNorm's num_batches_tracked is a counter, absent from older torchvision files: not a weight.
    report.missing = sorted(k for k in set(own) - set(usable) if not k.endswith("num_batches_tracked"))
    if report.missing or report.unexpected:
        log.warning(report.summary())
    else:
        log.info(report.summary())
    return report
