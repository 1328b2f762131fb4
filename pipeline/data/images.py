"""Decoding for every reader (training stream, evaluation, inference): encoded bytes -> uint8 pixels.

Two steps, each chosen for speed with PIL as the reference:

1. `decode_rgb`: the JPEG decoder of `simplejpeg` when it is installed (an optional dependency, the
   `fast` extra), PIL otherwise and for PNGs or anything simplejpeg refuses (CMYK, slightly damaged
   files that PIL still reads). A JPEG at least twice the target size is decoded at 1/2, 1/4 or 1/8
   scale in the DCT domain, the factor PIL's `draft` picks. Both libraries run libjpeg-turbo with the
   same settings (accurate integer IDCT, smooth chroma upsampling), so the pixels are identical; for
   the small crops of re-ID datasets simplejpeg is about 3x faster than PIL because it skips PIL's
   per-image Python machinery.
2. `resize_batch`: torch's uint8 bilinear interpolation with antialiasing, one call for all images of
   one source size. It implements PIL's BILINEAR filter (identical when upscaling, as for
   Market-1501's 128x64 crops at 256x128; at most 1 grey level apart when shrinking) and is about 4x
   faster than PIL's resize on a batch.

tests/test_data_images.py pins both against plain PIL. `decode` (one image) is what inference uses
for image files, so a file's features equal those `evaluate` computes for it from the shards.
"""
from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

try:  # optional: pip install simplejpeg (the project's `fast` extra)
    import simplejpeg
except ImportError:  # pragma: no cover - exercised where simplejpeg is absent
    simplejpeg = None

JPEG_MAGIC = b"\xff\xd8\xff"


def draft_scale(source_hw: tuple[int, int], size: tuple[int, int]) -> int:
    """The DCT scale PIL's JPEG `draft` picks: the largest of 8, 4, 2, 1 that keeps both sides >= size."""
    scale = min(source_hw[1] // size[1], source_hw[0] // size[0])
    return next((s for s in (8, 4, 2) if scale >= s), 1)


def _decode_pil(data: bytes, size: tuple[int, int]) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        if im.format == "JPEG":
            im.draft("RGB", (size[1], size[0]))   # DCT-domain downscale when the source is larger
        return np.array(im.convert("RGB"))


def _decode_simplejpeg(data: bytes, size: tuple[int, int]) -> np.ndarray:
    h, w = simplejpeg.decode_jpeg_header(data)[:2]
    s = draft_scale((h, w), size)
    # min sizes of exactly ceil(side / s) make libjpeg-turbo choose the scale 1/s, as PIL's draft does
    out = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-h // s), min_width=-(-w // s))
    if out.shape[:2] != (-(-h // s), -(-w // s)):
        raise ValueError(f"simplejpeg decoded {out.shape[:2]}, expected 1/{s} of {(h, w)}")
    return out


def decode_rgb(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """Encoded image -> uint8 [h, w, 3] RGB at its own size (a JPEG possibly reduced in the DCT domain,
    never below `size` (H, W)). Raises on undecodable data."""
    if simplejpeg is not None and data[:3] == JPEG_MAGIC:
        try:
            return _decode_simplejpeg(data, size)
        except Exception:  # noqa: BLE001 - PIL decides: it is the reference, and it may still read it
            pass
    return _decode_pil(data, size)


def resize_batch(images: list[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
    """uint8 [h, w, 3] arrays (any sizes) -> uint8 [N, 3, H, W], resizing each group of same-sized
    images with one call (bilinear, antialiased: PIL's BILINEAR).

    The result is in channels_last memory format (a view of [N, H, W, 3] pixels, the decoders' layout):
    converting uint8 pixels to planar NCHW on the CPU costs twice the resize itself, while on the
    training device it is free (and `train.channels_last` wants this layout anyway). `.contiguous()`
    gives planar NCHW."""
    h, w = size
    out = None
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(image.shape, []).append(i)
    for shape, members in groups.items():
        x = torch.from_numpy(np.stack([images[i] for i in members]))          # [m, h0, w0, 3]
        if shape[:2] != (h, w):
            x = F.interpolate(x.permute(0, 3, 1, 2), size=(h, w), mode="bilinear", align_corners=False,
                              antialias=True).permute(0, 2, 3, 1).contiguous()   # channels_last: a view
        if len(members) == len(images):
            out = x
        else:
            if out is None:
                out = torch.empty((len(images), h, w, 3), dtype=torch.uint8)
            out[torch.tensor(members)] = x
    if out is None:
        out = torch.empty((0, h, w, 3), dtype=torch.uint8)
    return out.permute(0, 3, 1, 2)


def decode(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """One encoded image -> uint8 [H, W, 3] at `size` (H, W). Raises on undecodable data."""
    return resize_batch([decode_rgb(data, size)], size)[0].permute(1, 2, 0).contiguous().numpy()


def decoder_name() -> str:
    """Which JPEG decoder this process uses (for logs and benchmarks)."""
    return f"simplejpeg {simplejpeg.__version__}" if simplejpeg is not None else "PIL"
