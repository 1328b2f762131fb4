"""The one conversion from the image forms a caller has to the batch the network takes.

`FeatureExtractor` (pipeline.inference) and the served model's `predict` (pipeline.serving) both call
`image_batch`, so every entry point accepts the same forms and computes the same pixels:

* a file path (str or Path): the evaluation's decoder (pipeline.data.images.decode: PIL's pixels,
  bilinear resize), so a file's features equal those `evaluate` computes for it from the shards;
* a PIL image: converted to RGB, resized with PIL's bilinear filter;
* a numpy array H x W x 3 (the PIL / OpenCV / MLflow layout, channels last);
* a torch tensor 3 x H x W (the torch layout, channels first);
* a batch: a list or tuple of any of those, or a numpy array N x H x W x 3, or a tensor N x 3 x H x W.

Arrays and tensors are uint8 in [0, 255] or float in [0, 1] (not yet normalised), any size; they get
an antialiased bilinear resize. An array whose last axis is not 3 but whose first is (3 x H x W) is
taken as channels first, and a tensor whose first axis is not 3 but whose last is as channels last,
so either layout works for either type; an image 3 x H x 3 follows its type's layout.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.data.images import decode
from pipeline.data.transforms import normalize, resize

ImageInput = str | Path | Image.Image | torch.Tensor | np.ndarray
FORMS = ("a file path, a PIL image, a numpy array H x W x 3, a tensor 3 x H x W, a list of those, "
         "or a batch N x H x W x 3 (numpy) / N x 3 x H x W (tensor)")


def _channels_first(item: torch.Tensor, channels_last: bool, where: str) -> torch.Tensor:
    """A 3-dim array/tensor as [3, H, W], by its type's layout (see the module docstring)."""
    if item.dim() != 3 or 3 not in (item.shape[0], item.shape[-1]):
        raise ValueError(f"{where}: an image array must be H x W x 3 (numpy) or 3 x H x W (tensor), got "
                         f"shape {tuple(item.shape)}")
    last = item.shape[-1] == 3 if channels_last else item.shape[0] != 3
    return item.permute(2, 0, 1) if last else item


def _to_chw(item: ImageInput, size: tuple[int, int], where: str) -> torch.Tensor:
    """One image -> [3, H, W] at `size`: uint8 for files and PIL images, float in [0, 1] for arrays."""
    if isinstance(item, (str, Path)):
        try:
            data = Path(item).read_bytes()
            return torch.from_numpy(decode(data, size).copy()).permute(2, 0, 1)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{where}: cannot read image {item}: {exc}") from None
    if isinstance(item, Image.Image):
        im = item.convert("RGB")
        if im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
    if isinstance(item, np.ndarray):
        if item.dtype == object or item.dtype.kind in "USV":
            raise TypeError(f"{where}: a numpy array of {item.dtype} is not an image; expected {FORMS}")
        x = _channels_first(torch.from_numpy(np.ascontiguousarray(item)), True, where)
    elif isinstance(item, torch.Tensor):
        x = _channels_first(item, False, where)
    else:
        raise TypeError(f"{where}: got a {type(item).__name__}; expected {FORMS}")
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    elif x.dtype.is_floating_point:
        if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
            raise ValueError(f"{where}: float images must hold values in [0, 1] (got "
                             f"{float(x.min()):.3g}..{float(x.max()):.3g}); pass uint8 for 0..255")
        x = x.float()
    else:
        raise ValueError(f"{where}: pixel dtype {x.dtype}; use uint8 (0..255) or float in [0, 1]")
    return resize(x[None], size)[0]


def image_items(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """The single images of `images`: one image, a list/tuple of them, or a 4-dim batch."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        return list(images.unbind(0))
    if isinstance(images, (str, Path, Image.Image, torch.Tensor, np.ndarray)):
        return [images]
    if isinstance(images, (list, tuple)):
        return list(images)
    raise TypeError(f"images: got a {type(images).__name__}; expected {FORMS}")


def image_batch(images: ImageInput | Sequence[ImageInput], size: Sequence[int]) -> torch.Tensor:
    """Images in any form above -> the normalised float32 batch [N, 3, H, W] at `size` (H, W) that the
    network (and the ONNX graph) takes. A 4-dim batch may be empty ([0, 3, H, W]); an empty list is
    an error. Errors name the image (its index) and what was expected."""
    size = (int(size[0]), int(size[1]))
    items = image_items(images)
    if not items:
        if isinstance(images, (np.ndarray, torch.Tensor)):
            return torch.zeros(0, 3, *size)
        raise ValueError("no images given")
    return torch.cat([normalize(_to_chw(item, size, f"image {i}")[None]) for i, item in enumerate(items)])
