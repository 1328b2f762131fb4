"""ResNet-18/34/50/101 and ResNeXt-50 (32x4d) trunks (no pooling, no fc) with a configurable last stride.

Module and parameter names are torchvision's (conv1, bn1, layer1.0.conv1, ..., layerN.0.downsample.0/1;
Bottleneck blocks put the stride on conv2, the "v1.5" variant torchvision ships), so torchvision's
ImageNet state dicts load as they are (pipeline/model/pretrained.py). ResNeXt-50 32x4d (the AlignedReID
paper's second base model, "ResNet50-Xception") is torchvision's: the same layout as ResNet-50 with
grouped 3x3 convolutions, 32 groups, bottleneck width int(planes * 4 / 64) * 32 (twice ResNet-50's).
"""
from __future__ import annotations

import torch
from torch import nn


# name -> (block type, blocks per stage)
ARCHS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnext50_32x4d": ("bottleneck", (3, 4, 6, 3)),
}
# Grouped (ResNeXt) trunks: name -> (groups, width per group), torchvision's arguments.
GROUPED: dict[str, tuple[int, int]] = {"resnext50_32x4d": (32, 4)}

# torchvision's ImageNet weights for each trunk (IMAGENET1K_V1, the weights the AlignedReID
# reproductions started from); the 8 hex digits in each name are the start of the file's sha256.
IMAGENET_URLS: dict[str, str] = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
    "resnext50_32x4d": "https://download.pytorch.org/models/resnext50_32x4d-7cdf4587.pth",
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
    """torchvision's Bottleneck: 1x1 -> 3x3 (stride, `groups`) -> 1x1 (x4). Its inner width is
    int(planes * width_per_group / 64) * groups: `planes` for ResNet (1, 64), twice that for 32x4d."""
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None,
                 groups: int = 1, width_per_group: int = 64):
        super().__init__()
        width = int(planes * width_per_group / 64) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
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
    (torchvision: 64); a smaller one gives a cheap network of the same structure and names for tests
    (ResNeXt keeps its 32 groups, so its width must be a multiple of 16: int(width * 4 / 64) >= 1)."""

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
        self.groups, self.width_per_group = GROUPED.get(name, (1, 64))
        if self.groups > 1 and width * self.width_per_group % 64:
            raise ValueError(f"width is {width}; {name} keeps {self.groups} groups of "
                             f"int(planes * {self.width_per_group} / 64) channels, so width must be a "
                             f"multiple of {64 // self.width_per_group} (torchvision: 64)")
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
        grouping = {} if block is BasicBlock else {"groups": self.groups, "width_per_group": self.width_per_group}
        layers = [block(self.inplanes, planes, stride, downsample, **grouping)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, None, **grouping) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))
