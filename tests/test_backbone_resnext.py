"""ResNeXt-50 32x4d, the AlignedReID paper's second base model ("ResNet50-Xception"): torchvision's
parameter names and shapes (checked against a layout written out here from torchvision's definition,
since torchvision is not installed), 2048 output channels, a forward pass, its ImageNet weights URL,
loading a torchvision-named state dict, and the config accepting it."""
from __future__ import annotations

import pytest
import torch

from pipeline.config import load_config
from pipeline.model import IMAGENET_URLS, ResNet, load_pretrained
from pipeline.model.pretrained import expected_sha256_prefix

# len(torchvision.models.resnext50_32x4d().state_dict()): the same modules as resnet50, wider.
KEY_COUNT = 320


def resnext50_32x4d_shapes(base: int = 64) -> dict[str, tuple[int, ...]]:
    """Key -> shape of torchvision's resnext50_32x4d state dict, fc included. torchvision:
    ResNet(Bottleneck, [3, 4, 6, 3], groups=32, width_per_group=4); in each Bottleneck
    width = int(planes * (width_per_group / 64.)) * groups; conv1 inplanes->width (1x1), conv2
    width->width (3x3, groups=32: weight [width, width / 32, 3, 3]), conv3 width->planes*4 (1x1);
    downsample (1x1 conv + BN) on the first block of every stage; planes 64, 128, 256, 512
    (`base` scales them for a narrow test network)."""
    groups, width_per_group = 32, 4
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, channels: int) -> None:
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{suffix}"] = (channels,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    shapes["conv1.weight"] = (base, 3, 7, 7)
    bn("bn1", base)
    inplanes = base
    for stage, (planes, blocks) in enumerate(zip((base, 2 * base, 4 * base, 8 * base), (3, 4, 6, 3)), start=1):
        width = int(planes * (width_per_group / 64.0)) * groups
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            shapes[f"{p}.conv1.weight"] = (width, inplanes, 1, 1)
            bn(f"{p}.bn1", width)
            shapes[f"{p}.conv2.weight"] = (width, width // groups, 3, 3)
            bn(f"{p}.bn2", width)
            shapes[f"{p}.conv3.weight"] = (planes * 4, width, 1, 1)
            bn(f"{p}.bn3", planes * 4)
            if b == 0:
                shapes[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    shapes["fc.weight"] = (1000, inplanes)
    shapes["fc.bias"] = (1000,)
    return shapes


def test_resnext50_32x4d_names_and_shapes_are_torchvisions() -> None:
    expected = resnext50_32x4d_shapes()
    assert len(expected) == KEY_COUNT
    # Spot checks against torchvision's published layout (bottleneck widths 128, 256, 512, 1024).
    assert expected["layer1.0.conv2.weight"] == (128, 4, 3, 3)
    assert expected["layer4.2.conv1.weight"] == (1024, 2048, 1, 1)
    assert expected["fc.weight"] == (1000, 2048)
    net = ResNet("resnext50_32x4d")
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert ours == {k: s for k, s in expected.items() if not k.startswith("fc.")}
    assert net.out_channels == 2048
    assert net.layer1[0].conv2.groups == 32 and net.layer4[0].conv2.groups == 32
    assert net.layer4[0].conv2.stride == (1, 1)   # last stride 1 by default


def test_resnext_narrow_network_runs_forward() -> None:
    torch.manual_seed(0)
    net = ResNet("resnext50_32x4d", last_stride=1, width=16).eval()
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert ours == {k: s for k, s in resnext50_32x4d_shapes(base=16).items() if not k.startswith("fc.")}
    with torch.no_grad():
        out = net(torch.randn(2, 3, 64, 32))
    assert out.shape == (2, net.out_channels, 4, 2) and net.out_channels == 16 * 8 * 4
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="multiple of 16"):
        ResNet("resnext50_32x4d", width=8)


def test_resnext_imagenet_url_and_loading(tmp_path) -> None:
    url = IMAGENET_URLS["resnext50_32x4d"]
    assert url == "https://download.pytorch.org/models/resnext50_32x4d-7cdf4587.pth"
    assert expected_sha256_prefix(url) == "7cdf4587"
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.zeros((), dtype=torch.int64) if k.endswith("num_batches_tracked")
                 else torch.randn(shape, generator=gen))
             for k, shape in resnext50_32x4d_shapes(base=16).items()}
    path = tmp_path / "resnext.pth"
    torch.save(state, path)
    net = ResNet("resnext50_32x4d", width=16)
    report = load_pretrained(net, str(path))
    assert not report.missing and not report.unexpected and sorted(report.ignored) == ["fc.bias", "fc.weight"]
    torch.testing.assert_close(net.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])


def test_config_accepts_resnext_as_a_market_override() -> None:
    cfg = load_config("market1501", ["model.backbone=resnext50_32x4d",
                                     f"model.pretrained={IMAGENET_URLS['resnext50_32x4d']}"])
    assert cfg.model.backbone == "resnext50_32x4d"
