"""Decoding (pipeline/data/images.py) pinned against plain PIL: simplejpeg's pixels equal PIL's (DCT
scaling included), the batched torch resize is PIL's BILINEAR within one grey level (equal when
upscaling Market-size crops), and without simplejpeg the PIL fallback gives the same pixels."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import images


def pil_reference(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """The previous decoder: PIL with draft, convert, bilinear resize."""
    with Image.open(io.BytesIO(data)) as im:
        if im.format == "JPEG":
            im.draft("RGB", (size[1], size[0]))
        im = im.convert("RGB")
        if im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BILINEAR)
        return np.array(im)


def encode(h: int, w: int, fmt: str = "JPEG", mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    im = Image.fromarray(base).resize((w, h), Image.BICUBIC)
    noise = rng.integers(-20, 20, (h, w, 3))
    im = Image.fromarray(np.clip(np.asarray(im).astype(int) + noise, 0, 255).astype(np.uint8)).convert(mode)
    out = io.BytesIO()
    im.save(out, format=fmt, quality=90)
    return out.getvalue()


CASES = [((128, 64), (256, 128)), ((128, 64), (128, 64)), ((300, 150), (256, 128)), ((1000, 500), (256, 128)),
         ((560, 240), (128, 64)), ((97, 33), (64, 32))]


@pytest.mark.parametrize("source,size", CASES)
def test_decode_matches_pil(source, size):
    for mode in ("RGB", "L"):
        data = encode(*source, mode=mode)
        ref = pil_reference(data, size)
        got = images.decode(data, size)
        assert got.shape == ref.shape == (*size, 3) and got.dtype == np.uint8
        diff = np.abs(got.astype(int) - ref)
        assert diff.max() <= 1, (source, size, mode)
        if source[0] <= size[0]:
            assert diff.max() == 0          # upscaling (Market crops at 256x128): identical


def test_simplejpeg_decodes_exactly_like_pil_including_dct_scaling(monkeypatch):
    if images.simplejpeg is None:
        pytest.skip("simplejpeg is not installed (PIL is used)")
    for source, size in CASES:
        for mode in ("RGB", "L"):
            data = encode(*source, mode=mode)
            fast = images._decode_simplejpeg(data, size)      # no fallback: simplejpeg itself
            slow = images._decode_pil(data, size)
            assert fast.shape == slow.shape and np.array_equal(fast, slow), (source, size, mode)
    assert images.decode_rgb(encode(1000, 500), (256, 128)).shape == (500, 250, 3)   # 1/2 in the DCT


def test_png_and_fallback_and_errors(monkeypatch):
    png = encode(160, 60, fmt="PNG")
    assert np.abs(images.decode(png, (128, 64)).astype(int) - pil_reference(png, (128, 64))).max() <= 1
    data = encode(128, 64)
    monkeypatch.setattr(images, "simplejpeg", None)
    assert np.array_equal(images.decode(data, (256, 128)), pil_reference(data, (256, 128)))
    monkeypatch.undo()
    with pytest.raises((OSError, ValueError)):
        images.decode(data[: len(data) // 3], (256, 128))       # truncated: PIL refuses it too
    with pytest.raises((OSError, ValueError)):
        images.decode(b"not an image", (256, 128))


def test_resize_batch_mixes_sizes_in_order():
    arrays = [images.decode_rgb(encode(h, w, seed=i), (64, 32)) for i, (h, w) in
              enumerate([(128, 64), (64, 32), (128, 64), (100, 40)])]
    batch = images.resize_batch(arrays, (64, 32))
    assert batch.shape == (4, 3, 64, 32) and batch.is_contiguous(memory_format=torch.channels_last)
    for i, a in enumerate(arrays):
        one = images.resize_batch([a], (64, 32))[0]
        assert np.array_equal(batch[i].numpy(), one.numpy())
