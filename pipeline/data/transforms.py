"""Batched image transforms on tensors, so augmentation can run on the training device (GPU or CPU).

`TrainAugment` is the re-ID recipe of the strong baselines: resize, random horizontal flip, pad then
random crop back to size, ImageNet normalisation, random erasing (Zhong et al.; after normalisation
with value 0, i.e. the mean colour). It draws from the global torch RNG of the tensor's device, so the
trainer's RNG state (checkpointed) fixes it. It is the only augmentation path: the data stream yields
uint8 batches and the trainer augments them on its device.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The mean colour in uint8: a stand-in for images that cannot be decoded at evaluation time.
MEAN_UINT8 = tuple(round(255 * m) for m in IMAGENET_MEAN)


def to_float(batch: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; float input is taken to be in [0, 1] already."""
    if batch.dtype == torch.uint8:
        return batch.float().div_(255.0)
    return batch.float()


def _normalize(x: torch.Tensor, inv_std: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(x / 255 - mean) / std for uint8 (x for floats), as one fused multiply-add into a new tensor."""
    scale = inv_std / 255 if x.dtype == torch.uint8 else inv_std
    return torch.addcmul(shift, x.float(), scale)


def _constants(device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return 1 / std, -mean / std


def normalize(batch: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float batch [N, 3, H, W] -> ImageNet-normalised float32 (no augmentation)."""
    return _normalize(batch, *_constants(batch.device))


def resize(batch: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Float batch -> bilinear resize to (H, W), antialiased when shrinking; no-op at the right size."""
    if tuple(batch.shape[-2:]) == tuple(image_size):
        return batch
    return F.interpolate(batch, size=tuple(image_size), mode="bilinear", align_corners=False, antialias=True)


class TrainAugment(nn.Module):
    """uint8 or [0, 1] float batch [N, 3, H, W] -> augmented, ImageNet-normalised float [N, 3, *image_size].

    Steps: resize, horizontal flip (per image, `flip_prob`), zero-pad by `pad` then crop back at a random
    offset, normalise, random erasing (per image, `erasing_prob`; area 2-40 %, aspect 0.3-3.3, value 0 =
    the mean colour, as in Zhong et al.). A probability or size of 0 switches its step off.

    Flip, pad and crop are one gather (on the uint8 batch when it is uint8: a quarter of the memory
    traffic), normalisation and erasing work in place, all vectorised over the batch on whatever
    device it is. kornia's augmentation modules do the same steps through generic per-sample
    parameter machinery that measured about 2x slower on a CPU (benchmarks/data_throughput.py prints
    both when kornia is installed)."""

    def __init__(self, image_size: tuple[int, int] | list[int], flip_prob: float = 0.5, pad: int = 10,
                 erasing_prob: float = 0.5, erasing_scale: tuple[float, float] = (0.02, 0.4),
                 erasing_ratio: tuple[float, float] = (0.3, 3.3)):
        super().__init__()
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.flip_prob, self.pad, self.erasing_prob = float(flip_prob), int(pad), float(erasing_prob)
        self.erasing_scale, self.erasing_ratio = erasing_scale, erasing_ratio
        inv_std, shift = _constants()
        self.register_buffer("inv_std", inv_std, persistent=False)
        self.register_buffer("shift", shift, persistent=False)

    def _flip_pad_crop(self, x: torch.Tensor) -> torch.Tensor:
        """Flip, zero-pad and crop back in one gather from the padded batch: output pixel (i, j) of an
        image reads padded pixel (i + oy, j + ox) of the (possibly flipped) image."""
        n, c, h, w = x.shape
        p, dev = self.pad, x.device
        flip = torch.rand(n, device=dev) < self.flip_prob
        oy = torch.randint(0, 2 * p + 1, (n, 1), device=dev)
        ox = torch.randint(0, 2 * p + 1, (n, 1), device=dev)
        pw = w + 2 * p
        rows = torch.arange(h, device=dev).view(1, h) + oy
        cols = torch.arange(w, device=dev).view(1, w) + ox
        cols = torch.where(flip.view(n, 1), pw - 1 - cols, cols)   # flipping the padded image
        index = (rows.view(n, h, 1) * pw + cols.view(n, 1, w)).view(n, 1, h * w).expand(n, c, h * w)
        return F.pad(x, (p, p, p, p)).flatten(2).gather(2, index).view(n, c, h, w)

    def _erase(self, x: torch.Tensor, attempts: int = 10) -> torch.Tensor:
        n, _, h, w = x.shape
        dev = x.device
        area = torch.empty(n, attempts, device=dev).uniform_(*self.erasing_scale) * (h * w)
        log_ratio = torch.empty(n, attempts, device=dev).uniform_(math.log(self.erasing_ratio[0]),
                                                                 math.log(self.erasing_ratio[1]))
        eh = (area * log_ratio.exp()).sqrt().round().long()
        ew = (area / log_ratio.exp()).sqrt().round().long()
        fits = (eh < h) & (ew < w) & (eh > 0) & (ew > 0)
        first = torch.where(fits.any(1), fits.float().argmax(1), torch.zeros(n, dtype=torch.long, device=dev))
        eh, ew = eh.gather(1, first[:, None]).squeeze(1), ew.gather(1, first[:, None]).squeeze(1)
        erase = fits.any(1) & (torch.rand(n, device=dev) < self.erasing_prob)
        y0 = (torch.rand(n, device=dev) * (h - eh + 1).clamp(min=1)).long()
        x0 = (torch.rand(n, device=dev) * (w - ew + 1).clamp(min=1)).long()
        # One slice assignment per erased image: cheaper than a full-batch mask pass.
        params = torch.stack([erase.long(), y0, x0, eh, ew], 1).tolist()
        for i, (selected, top, left, height, width) in enumerate(params):
            if selected:
                x[i, :, top:top + height, left:left + width] = 0.0
        return x

    @torch.no_grad()
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch if tuple(batch.shape[-2:]) == self.image_size else resize(to_float(batch), self.image_size)
        if self.flip_prob > 0 or self.pad > 0:
            x = self._flip_pad_crop(x)         # on uint8 when possible: a quarter of the memory traffic
        x = _normalize(x, self.inv_std, self.shift)   # a new tensor: the caller's is never modified
        if self.erasing_prob > 0:
            x = self._erase(x)
        return x

    def extra_repr(self) -> str:
        return (f"image_size={self.image_size}, flip_prob={self.flip_prob}, pad={self.pad}, "
                f"erasing_prob={self.erasing_prob}")
