"""The AlignedReID network: torchvision parameter names and shapes (checked against an independent
enumeration of torchvision's ResNet layout), pretrained loading from a file and a URL with its report,
last stride, train/eval outputs, mutual pairs and rebuilding from checkpoints."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.config import Config, ModelConfig
from pipeline.model import (AlignedReID, MutualPair, ResNet, build_model, convert_sync_bn, load_pretrained,
                            model_from_checkpoint)

TORCHVISION_LAYOUT = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
                      "resnet50": ("bottleneck", (3, 4, 6, 3)), "resnet101": ("bottleneck", (3, 4, 23, 3))}
# len(torchvision.models.resnetXX().state_dict()), for a check of the enumeration itself.
TORCHVISION_KEY_COUNTS = {"resnet18": 122, "resnet34": 218, "resnet50": 320, "resnet101": 626}


def torchvision_state_shapes(name: str, width: int = 64) -> dict[str, tuple[int, ...]]:
    """Key -> shape of torchvision's ResNet state dict, fc included, written out from its layout
    (width = 64 is torchvision's; other widths scale every channel count alike)."""
    kind, counts = TORCHVISION_LAYOUT[name]
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, channels: int) -> None:
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{suffix}"] = (channels,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    shapes["conv1.weight"] = (width, 3, 7, 7)
    bn("bn1", width)
    inplanes = width
    for stage, (planes, blocks) in enumerate(zip((width, 2 * width, 4 * width, 8 * width), counts), start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            if kind == "basic":
                shapes[f"{p}.conv1.weight"] = (planes, inplanes, 3, 3)
                bn(f"{p}.bn1", planes)
                shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                bn(f"{p}.bn2", planes)
                out = planes
            else:
                shapes[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
                bn(f"{p}.bn1", planes)
                shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                bn(f"{p}.bn2", planes)
                shapes[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
                bn(f"{p}.bn3", planes * 4)
                out = planes * 4
            if b == 0 and (stage > 1 or inplanes != out):
                shapes[f"{p}.downsample.0.weight"] = (out, inplanes, 1, 1)
                bn(f"{p}.downsample.1", out)
            inplanes = out
    shapes["fc.weight"] = (1000, inplanes)
    shapes["fc.bias"] = (1000,)
    return shapes


def random_torchvision_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.randint(0, 1000, (), generator=gen) if k.endswith("num_batches_tracked")
                else torch.randn(shape, generator=gen))
            for k, shape in torchvision_state_shapes(name).items()}


@pytest.mark.parametrize("name", sorted(TORCHVISION_LAYOUT))
def test_backbone_names_and_shapes_are_torchvision(name: str) -> None:
    expected = torchvision_state_shapes(name, width=4)
    assert len(expected) == TORCHVISION_KEY_COUNTS[name]
    ours = ResNet(name, width=4).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: s for k, s in expected.items()
                                                             if not k.startswith("fc.")}


def test_resnet50_full_width_matches_torchvision() -> None:
    ours = ResNet("resnet50").state_dict()
    expected = torchvision_state_shapes("resnet50")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: s for k, s in expected.items()
                                                             if not k.startswith("fc.")}
    assert expected["fc.weight"] == (1000, 2048)


@pytest.mark.parametrize("name,block", [("resnet18", "conv1"), ("resnet50", "conv2")])
def test_last_stride(name: str, block: str) -> None:
    for last_stride, expected_map in ((1, (4, 2)), (2, (2, 1))):
        net = ResNet(name, last_stride, width=4).eval()
        assert getattr(net.layer4[0], block).stride == (last_stride, last_stride)
        assert net.layer4[0].downsample[0].stride == (last_stride, last_stride)
        assert net(torch.randn(1, 3, 64, 32)).shape[2:] == expected_map


def test_train_and_eval_outputs() -> None:
    torch.manual_seed(0)
    model = AlignedReID(7, backbone="resnet18", last_stride=1, width=4, local_dim=16)
    x = torch.randn(3, 3, 64, 32)
    out = model.train()(x)
    assert out["global"].shape == (3, 32) and out["local"].shape == (3, 4, 16)
    assert out["logits"].shape == (3, 7)
    model.eval()
    feat, local = model(x, return_local=True)
    torch.testing.assert_close(model(x), feat)
    # Eval local features pass through the trained 1x1 conv, BN (running stats) and ReLU.
    fmap = model.backbone(x)
    manual = torch.relu(model.local_bn(model.local_conv(fmap.mean(3, keepdim=True))))
    manual = manual.squeeze(3).transpose(1, 2)
    torch.testing.assert_close(local, manual)
    # Eval global feature is the neck's output of the average-pooled map.
    torch.testing.assert_close(feat, model.neck(fmap.mean((2, 3))))
    assert not model.neck.bias.requires_grad


def test_max_stripe_pool_and_no_neck() -> None:
    torch.manual_seed(0)
    model = AlignedReID(4, backbone="resnet18", width=4, neck=False, stripe_pool="max").eval()
    x = torch.randn(2, 3, 64, 32)
    fmap = model.backbone(x)
    feat, local = model(x, return_local=True)
    torch.testing.assert_close(feat, fmap.mean((2, 3)))
    manual = torch.relu(model.local_bn(model.local_conv(fmap.amax(3, keepdim=True))))
    manual = manual.squeeze(3).transpose(1, 2)
    torch.testing.assert_close(local, manual)
    assert model.classifier.bias is not None


@pytest.mark.parametrize("head", ["pool-conv-bn-relu", "bn-relu-pool-conv", "pool-conv-bn"])
@pytest.mark.parametrize("normalize", [False, True])
def test_local_heads(head: str, normalize: bool, tmp_path: Path) -> None:
    """Each local head gives [N, S, local_dim] stripes in train and eval mode; local_normalize makes
    every stripe unit length; the whitened head (pool-conv-bn) has signed stripes whose every dimension
    is centred with unit variance over the batch in training (so they cannot collapse), and no learnt
    BN scale or shift; every head survives a checkpoint round trip."""
    torch.manual_seed(0)
    cfg = Config()
    cfg.model.backbone, cfg.model.last_stride, cfg.model.local_dim = "resnet18", 1, 16
    cfg.model.local_head, cfg.model.local_normalize = head, normalize
    model = build_model(cfg.model, 5)
    x = torch.randn(6, 3, 32, 16)                   # a 2x1 map: 2 stripes
    local = model.train()(x)["local"]
    assert local.shape == (6, 2, 16)
    norms = local.norm(dim=2)
    if normalize:
        torch.testing.assert_close(norms, torch.ones_like(norms))
    if head == "pool-conv-bn":
        assert model.local_bn.weight is None and model.local_bn.bias is None
        raw = model.local_bn(model.local_conv(model.backbone(x).mean(3, keepdim=True)))
        assert (raw < 0).any()
        torch.testing.assert_close(raw.mean((0, 2, 3)), torch.zeros(16), atol=1e-5, rtol=0)
        torch.testing.assert_close(raw.var((0, 2, 3), unbiased=False), torch.ones(16), atol=1e-3, rtol=0)
    elif head == "pool-conv-bn-relu" and not normalize:
        assert (local >= 0).all()
    model.eval()
    feat, local = model(x, return_local=True)
    assert local.shape == (6, 2, 16)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"format": "alignedreid-ckpt-v1", "config": cfg.to_dict(), "num_classes": 5, "mutual": False,
                "epoch": 0, "global_step": 1, "model": model.state_dict()}, ckpt)
    again, _ = model_from_checkpoint(ckpt)
    for got, want in zip(again(x, return_local=True), (feat, local)):
        torch.testing.assert_close(got, want)


def test_unknown_local_head() -> None:
    with pytest.raises(ValueError, match="local_head is 'conv-pool'; must be one of"):
        AlignedReID(3, backbone="resnet18", width=4, local_head="conv-pool")


def test_mutual_pair_outputs() -> None:
    torch.manual_seed(0)
    pair = MutualPair(AlignedReID(4, "resnet18", width=4), AlignedReID(4, "resnet18", width=4))
    x = torch.randn(2, 3, 64, 32)
    outs = pair.train()(x)
    assert isinstance(outs, list) and len(outs) == 2 and not torch.equal(outs[0]["logits"], outs[1]["logits"])
    pair.eval()
    torch.testing.assert_close(pair(x), pair.nets[0](x))


def test_pretrained_from_file_and_url(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = random_torchvision_state("resnet18")
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(state, path)
    model = build_model(ModelConfig(backbone="resnet18", pretrained=str(path)), num_classes=3)
    report = model.pretrained_report
    assert report.ignored == ["fc.weight", "fc.bias"] and not report.missing and not report.unexpected
    assert len(report.loaded) == TORCHVISION_KEY_COUNTS["resnet18"] - 2
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, state[key], msg=key)

    # Through a URL (file:// needs no network): downloaded into the cache directory, then loaded.
    cache = tmp_path / "cache"
    net = ResNet("resnet18")
    report = load_pretrained(net, path.as_uri(), cache_dir=str(cache))
    assert (cache / path.name).is_file() and len(report.loaded) == len(state) - 2
    torch.testing.assert_close(net.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])

    # A key missing from the file and one the backbone does not have are both reported.
    partial = {k: v for k, v in state.items() if k != "layer2.0.conv1.weight"}
    partial["head.extra.weight"] = torch.zeros(3)
    partial_path = tmp_path / "partial.pth"
    torch.save(partial, partial_path)
    with caplog.at_level(logging.WARNING, logger="pipeline.model.pretrained"):
        report = load_pretrained(ResNet("resnet18"), str(partial_path))
    assert report.missing == ["layer2.0.conv1.weight"] and report.unexpected == ["head.extra.weight"]
    assert "layer2.0.conv1.weight" in caplog.text and "head.extra.weight" in caplog.text


def test_pretrained_errors(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(random_torchvision_state("resnet18"), path)
    with pytest.raises(ValueError, match=r"layer1\.0\.conv1\.weight: file \(64, 64, 3, 3\) vs model"):
        load_pretrained(ResNet("resnet50", width=64), str(path))    # weights of another depth
    with pytest.raises(FileNotFoundError, match="model.pretrained"):
        load_pretrained(ResNet("resnet18", width=4), str(tmp_path / "absent.pth"))
    other = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="no key of a torchvision resnet18"):
        load_pretrained(ResNet("resnet18", width=4), str(other))


def test_model_from_checkpoint(tmp_path: Path) -> None:
    cfg = Config()
    cfg.model.backbone, cfg.model.last_stride = "resnet18", 2
    torch.manual_seed(0)
    pair = MutualPair(build_model(cfg.model, 6), build_model(cfg.model, 6)).eval()
    x = torch.randn(1, 3, 64, 32)
    expected = pair.nets[0](x, return_local=True)
    ckpt = tmp_path / "ckpt-0003-000042.pt"
    state = {"format": "alignedreid-ckpt-v1", "config": cfg.to_dict(), "num_classes": 6, "mutual": True,
             "epoch": 3, "global_step": 42,
             "model": {f"module.{k}": v for k, v in pair.state_dict().items()}}  # as saved from DDP
    torch.save(state, ckpt)
    model, info = model_from_checkpoint(ckpt)
    assert not model.training and info["mutual"] and info["num_classes"] == 6 and info["global_step"] == 42
    for got, want in zip(model(x, return_local=True), expected):
        torch.testing.assert_close(got, want)

    bare = tmp_path / "model.pt"
    torch.save(pair.nets[1].state_dict(), bare)
    with pytest.raises(ValueError, match="bare state dict"):
        model_from_checkpoint(bare)
    model, info = model_from_checkpoint(bare, model_cfg=cfg.model, num_classes=6)
    torch.testing.assert_close(model(x), pair.nets[1](x))
    with pytest.raises(ValueError, match=r"classifier\.weight: file \(6, 512\) vs model \(9, 512\)"):
        model_from_checkpoint(bare, model_cfg=cfg.model, num_classes=9)


def test_convert_sync_bn() -> None:
    model = AlignedReID(3, "resnet18", width=4)
    count = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    synced = convert_sync_bn(model)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == count
