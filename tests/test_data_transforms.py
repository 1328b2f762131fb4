"""TrainAugment and normalize: each step checked against its definition."""
from __future__ import annotations

import torch

from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TrainAugment, normalize

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def batch(n=16, h=32, w=16, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)   # no zeros: padding shows


def test_normalize_uint8_and_float_agree():
    x = batch()
    expected = (x.float() / 255 - MEAN) / STD
    assert torch.allclose(normalize(x), expected, atol=1e-6)
    assert torch.allclose(normalize(x.float() / 255), expected, atol=1e-6)


def test_flip_only_and_identity():
    x = batch()
    assert torch.allclose(TrainAugment((32, 16), flip_prob=1.0, pad=0, erasing_prob=0)(x), normalize(x.flip(-1)))
    same = TrainAugment((32, 16), flip_prob=0, pad=0, erasing_prob=0)
    assert torch.allclose(same(x), normalize(x))
    f = x.float() / 255
    before = f.clone()
    same(f)
    assert torch.equal(f, before), "the input must not be modified"


def test_pad_crop_is_a_shift_within_the_padding():
    x = batch(n=32)
    pad = 3
    out = TrainAugment((32, 16), flip_prob=0.5, pad=pad, erasing_prob=0)(x)
    raw = out * STD + MEAN                       # back to [0, 1]
    offsets = set()
    for i in range(x.shape[0]):
        matched = False
        for flip in (False, True):
            src = x[i].flip(-1) if flip else x[i]
            padded = torch.nn.functional.pad(src.float() / 255, (pad,) * 4)
            for dy in range(2 * pad + 1):
                for dx in range(2 * pad + 1):
                    if torch.allclose(padded[:, dy:dy + 32, dx:dx + 16], raw[i], atol=1e-5):
                        matched = True
                        offsets.add((flip, dy, dx))
        assert matched, f"image {i} is not a flipped/padded crop of its input"
    assert len(offsets) > 5 and {f for f, _, _ in offsets} == {False, True}


def test_erasing_blanks_one_rectangle_to_the_mean_colour():
    x = batch(n=64)
    out = TrainAugment((32, 16), flip_prob=0, pad=0, erasing_prob=1.0)(x)
    ref = normalize(x)
    erased = 0
    for i in range(x.shape[0]):
        changed = (out[i] != ref[i]).any(0)
        if not changed.any():
            continue
        erased += 1
        ys, xs = changed.nonzero(as_tuple=True)
        box = out[i][:, ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        assert (box == 0).all(), "the erased area is one rectangle of zeros (the mean after normalising)"
        area = box.shape[1] * box.shape[2] / (32 * 16)
        assert 0.005 <= area <= 0.45
    assert erased >= 56                          # probability 1: all but attempts that never fit


def test_resize_seeded_determinism_and_uint8_float_equivalence():
    x = batch(h=64, w=32)
    aug = TrainAugment((32, 16))
    torch.manual_seed(3)
    a = aug(x)
    torch.manual_seed(3)
    b = aug(x)
    torch.manual_seed(3)
    c = aug(x.float() / 255)
    assert a.shape == (16, 3, 32, 16) and a.dtype == torch.float32
    assert torch.equal(a, b) and torch.allclose(a, c, atol=1e-5)
    torch.manual_seed(4)
    assert not torch.equal(a, aug(x))
