"""The model's own preprocessing: the Hugging Face image processor's geometry and
normalisation as one cheap, picklable function, for fixed-size images (`ImageTransform`)
and for SigLIP 2 NaFlex patch sequences (`PatchTransform`); `image_transform` picks one."""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- preprocessing


def _size_get(size: Any, key: str) -> Any:
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def _triple(v: Any) -> tuple[float, float, float]:
    if isinstance(v, int | float):
        return (float(v),) * 3
    t = tuple(float(x) for x in v)
    return t if len(t) == 3 else (t[0],) * 3


@dataclass(frozen=True)
class ImageTransform:
    """The model's own image-processor settings applied to a PIL image -> [3, H, W] float.

    Reads resolution, resize mode (fixed height x width, or shortest edge keeping the aspect
    ratio, as CLIP), centre crop, rescale and mean/std from the HF image processor and
    reproduces its geometry exactly (same output sizes, same PIL resampling, same crop and
    zero padding offsets, transparency composited on white), but runs as one cheap function
    that pickles into DataLoader worker processes.
    """

    height: int
    width: int
    shortest_edge: int | None
    crop: tuple[int, int] | None
    resample: int
    rescale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    do_resize: bool = True
    alpha_on_white: bool = True

    @classmethod
    def from_processor(cls, image_processor: Any) -> ImageTransform:
        ip = image_processor
        size = getattr(ip, "size", None)
        shortest = _size_get(size, "shortest_edge")
        h, w = _size_get(size, "height"), _size_get(size, "width")
        do_resize = bool(getattr(ip, "do_resize", True))
        if do_resize and not shortest and not (h and w):
            raise ValueError(f"unsupported image-processor size {size!r}: "
                             "expected height/width or shortest_edge")
        if do_resize and shortest and _size_get(size, "longest_edge"):
            raise ValueError("unsupported image-processor size: shortest_edge with "
                             "longest_edge")
        crop = None
        cs = getattr(ip, "crop_size", None)
        if getattr(ip, "do_center_crop", False) and cs:
            crop = (int(_size_get(cs, "height")), int(_size_get(cs, "width")))
        default = int(shortest or 224)
        return cls(int(h or default), int(w or default),
                   int(shortest) if shortest and not (h and w) else None, crop,
                   **_pixel_settings(ip), do_resize=do_resize)

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(H, W) of every output, or None when it depends on the image (shortest-edge
        resize without a crop)."""
        if self.crop:
            return self.crop
        if self.do_resize and self.shortest_edge is None:
            return (self.height, self.width)
        return None

    def resize_size(self, w: int, h: int) -> tuple[int, int]:
        """(width, height) after the resize step, as HF computes it (the long side of a
        shortest-edge resize is truncated, not rounded)."""
        if not self.do_resize:
            return w, h
        if self.shortest_edge is None:
            return self.width, self.height
        s = self.shortest_edge
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(s * long / short)
        return (s, new_long) if w <= h else (new_long, s)

    def to_rgb(self, img: Image.Image) -> Image.Image:
        if img.mode == "RGB":
            return img
        if self.alpha_on_white and ("A" in img.getbands()
                                    or img.info.get("transparency") is not None):
            rgba = img.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(bg, rgba).convert("RGB")
        return img.convert("RGB")

    def resize_uint8(self, img: Image.Image) -> np.ndarray:
        """Resize (and crop) to the model's input resolution as HWC uint8."""
        img = self.to_rgb(img)
        size = self.resize_size(*img.size)
        if size != img.size:
            img = img.resize(size, self.resample)
        arr = np.asarray(img)
        if self.crop:
            arr = _center_crop(arr, *self.crop)
        return arr

    @functools.cached_property
    def _affine(self) -> tuple[np.ndarray, np.ndarray]:
        a = np.array([self.rescale / s for s in self.std], dtype=np.float32).reshape(3, 1, 1)
        b = np.array([m / s for m, s in zip(self.mean, self.std, strict=True)],
                     dtype=np.float32).reshape(3, 1, 1)
        return a, b

    def affine_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(rescale / std, mean / std) as [3, 1, 1] float32 tensors on `device`: made once
        by whoever normalises there (`DeviceBatches`), since each copy to a GPU from
        pageable memory blocks the host."""
        a, b = self._affine
        return torch.from_numpy(a).to(device), torch.from_numpy(b).to(device)

    def normalize(self, arr: np.ndarray | torch.Tensor, out: torch.Tensor | None = None,
                  affine: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """HWC (or NHWC) uint8 -> CHW (NCHW) float32, rescaled and normalised, written into
        `out` when given. One fused multiply-subtract, x * (rescale / std) - mean / std:
        HF's (x * rescale - mean) / std up to float32 rounding (within 1e-6). A tensor on
        another device is normalised there, with `affine` (`affine_on`) when given."""
        if isinstance(arr, torch.Tensor) and arr.device.type != "cpu":
            a, b = affine if affine is not None else self.affine_on(arr.device)
            return arr.movedim(-1, -3).float().mul_(a).sub_(b)
        x = arr.numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
        x = np.moveaxis(x, -1, -3)
        if out is None:
            out = torch.empty(x.shape, dtype=torch.float32)
        o = out.numpy()
        a, b = self._affine
        np.multiply(x, a, out=o)
        np.subtract(o, b, out=o)
        return out

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.normalize(self.resize_uint8(img))

    def inputs(self, arr: np.ndarray) -> dict[str, torch.Tensor]:
        """The vision tower's inputs of one image resized by `resize_uint8` (HWC uint8):
        `pixel_values` [3, H, W]."""
        return {"pixel_values": self.normalize(arr)}

    def blank(self) -> np.ndarray:
        """A black image whose `inputs` have the shape of every other image's (where the
        shape is fixed), standing in for an unreadable one."""
        h, w = self.output_size or (1, 1)
        return np.zeros((h, w, 3), np.uint8)


def _pixel_settings(ip: Any) -> dict[str, Any]:
    """Resampling filter, rescale factor, mean/std and RGB conversion of an HF image
    processor, as `ImageTransform` fields."""
    resample = getattr(ip, "resample", None)
    resample = Image.BICUBIC if resample is None else resample
    rescale = float(getattr(ip, "rescale_factor", 1 / 255) or 1 / 255)
    if not getattr(ip, "do_rescale", True):
        rescale = 1.0
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if getattr(ip, "do_normalize", True):
        mean, std = _triple(ip.image_mean), _triple(ip.image_std)
    return {"resample": int(resample), "rescale": rescale, "mean": mean, "std": std,
            "alpha_on_white": bool(getattr(ip, "do_convert_rgb", True))}


def is_patch_processor(image_processor: Any) -> bool:
    """Whether an HF image processor makes NaFlex patch sequences (SigLIP 2's
    `Siglip2ImageProcessor`: a patch size and a patch budget) rather than fixed images."""
    return bool(getattr(image_processor, "max_num_patches", None)
                and getattr(image_processor, "patch_size", None))


@dataclass(frozen=True)
class PatchTransform:
    """SigLIP 2 NaFlex preprocessing, as `Siglip2ImageProcessor` does it: resize keeping
    the aspect ratio to the largest size of whole patches within `max_num_patches` (Hugging
    Face's own `get_image_size_for_max_num_patches`), rescale and normalise, cut into
    `patch_size` x `patch_size` patches (row-major, each flattened as (row, column,
    channel)) and pad the sequence with zero patches to `max_num_patches`.

    `pixels` holds the resampling filter and normalisation (an `ImageTransform` whose
    geometry is unused), so both transforms normalise through the same code. Every output
    has the same shape, [max_num_patches, patch_size**2 * 3], whatever the image's."""

    pixels: ImageTransform
    patch_size: int
    max_num_patches: int

    @classmethod
    def from_processor(cls, image_processor: Any,
                       max_num_patches: int | None = None) -> PatchTransform:
        """The processor's settings; `max_num_patches` (the spec's) overrides its budget."""
        ip = image_processor
        if not getattr(ip, "do_resize", True):
            raise ValueError("unsupported NaFlex image processor: do_resize is false (images "
                             "must be resized to whole patches)")
        pixels = ImageTransform(0, 0, None, None, **_pixel_settings(ip), do_resize=False)
        return cls(pixels, int(ip.patch_size), int(max_num_patches or ip.max_num_patches))

    @property
    def output_size(self) -> None:
        """None: the resized image's size depends on its aspect ratio."""
        return None

    def resize_size(self, w: int, h: int) -> tuple[int, int]:
        """(width, height) of the resized image: whole patches, at most `max_num_patches`."""
        from transformers.models.siglip2.image_processing_pil_siglip2 import (
            get_image_size_for_max_num_patches,
        )

        th, tw = get_image_size_for_max_num_patches(h, w, self.patch_size, self.max_num_patches)
        return tw, th

    def resize_uint8(self, img: Image.Image) -> np.ndarray:
        """Resize to whole patches within the budget, as HWC uint8."""
        img = self.pixels.to_rgb(img)
        size = self.resize_size(*img.size)
        if size != img.size:
            img = img.resize(size, self.pixels.resample)
        return np.asarray(img)

    def normalize(self, arr: np.ndarray | torch.Tensor,
                  out: torch.Tensor | None = None) -> torch.Tensor:
        """HWC uint8 -> CHW float32, rescaled and normalised (`ImageTransform.normalize`)."""
        return self.pixels.normalize(arr, out)

    def inputs(self, arr: np.ndarray) -> dict[str, torch.Tensor]:
        """The vision tower's inputs of one resized image: `pixel_values` [P, p*p*3],
        `pixel_attention_mask` [P] (int32, 1 for the image's patches) and `spatial_shapes`
        [2] (its height and width in patches), P = `max_num_patches`."""
        from transformers.models.siglip2.image_processing_pil_siglip2 import (
            convert_image_to_patches,
            pad_along_first_dim,
        )

        chw = self.normalize(arr).numpy()
        patches, mask = pad_along_first_dim(convert_image_to_patches(chw, self.patch_size),
                                            self.max_num_patches)
        p = self.patch_size
        return {"pixel_values": torch.from_numpy(patches),
                "pixel_attention_mask": torch.from_numpy(mask),
                "spatial_shapes": torch.tensor([chw.shape[1] // p, chw.shape[2] // p])}

    def __call__(self, img: Image.Image) -> dict[str, torch.Tensor]:
        return self.inputs(self.resize_uint8(img))

    def blank(self) -> np.ndarray:
        """A black one-patch image (its inputs have the shape of every other image's)."""
        return np.zeros((self.patch_size, self.patch_size, 3), np.uint8)


Transform = ImageTransform | PatchTransform


def image_transform(image_processor: Any, max_num_patches: int | None = None) -> Transform:
    """The transform of a checkpoint's image processor: `PatchTransform` for a NaFlex
    processor (with the spec's `model.max_num_patches`, if any), else `ImageTransform`."""
    if is_patch_processor(image_processor):
        return PatchTransform.from_processor(image_processor, max_num_patches)
    if max_num_patches is not None:
        raise ValueError(f"model.max_num_patches: {type(image_processor).__name__} makes "
                         "fixed-size images, not patch sequences")
    return ImageTransform.from_processor(image_processor)


def _center_crop(arr: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """HF's `center_crop` on HWC: offsets (H - ch) // 2, zero padding when too small."""
    h, w = arr.shape[:2]
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return arr[top:top + ch, left:left + cw]
    nh, nw = max(ch, h), max(cw, w)
    padded = np.zeros((nh, nw, *arr.shape[2:]), dtype=arr.dtype)
    tp, lp = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    padded[tp:tp + h, lp:lp + w] = arr
    top, left = top + tp, left + lp
    return padded[max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]
