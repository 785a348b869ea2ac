"""Image loading and the tokenizer's preprocessing (SPEC §2.1).

Every input (path, PIL image, numpy array, tensor) becomes an RGB PIL image first, so all of them share one
resize path: PIL bicubic to (size, size), no crop, then /255 and CLIP mean/std. This is bit-for-bit what
torchvision's ``Resize((224, 224), BICUBIC) -> ToTensor -> Normalize`` does on a PIL image (torchvision calls
PIL's resize), without depending on torchvision.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import ImageError, ImageTooLargeError

ImageInput = Any  # str | os.PathLike | PIL.Image.Image | np.ndarray | torch.Tensor

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def load_image(image: ImageInput, background: tuple[int, int, int] | None = None) -> Image.Image:
    """Any supported input -> an RGB PIL image.

    Conversion is the reference's ``Image.convert("RGB")`` (RGBA simply drops alpha). With ``background``
    set, images with transparency are composited onto that colour first instead.
    """
    if isinstance(image, (str, os.PathLike)):
        image = _open(Path(image))
    elif isinstance(image, np.ndarray):
        image = _from_array(image)
    elif isinstance(image, torch.Tensor):
        image = _from_array(_tensor_to_hwc(image))
    elif not isinstance(image, Image.Image):
        raise ImageError(f"unsupported image input of type {type(image).__name__}")
    return to_rgb(image, background)


def to_rgb(image: Image.Image, background: tuple[int, int, int] | None = None) -> Image.Image:
    if image.mode.startswith("I;16"):  # 16-bit grayscale (PNG, TIFF): scale to 8 bits (PIL would clip at 255)
        image = Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8), mode="L")
    if image.mode == "La":  # premultiplied alpha has no direct path to RGB/RGBA in Pillow
        image = image.convert("LA")
    if background is not None and _has_alpha(image):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError:
        try:  # a few rare modes have no direct path to RGB; go through RGBA
            return image.convert("RGBA").convert("RGB")
        except ValueError as exc:
            raise ImageError(f"cannot convert image mode {image.mode!r} to RGB: {exc}") from None


def preprocess(images: Sequence[Image.Image], size: int, mean: Sequence[float], std: Sequence[float],
               resample: str = "bicubic") -> torch.Tensor:
    """RGB PIL images -> normalised pixel tensor [B, 3, size, size] (fp32)."""
    method = _RESAMPLE[resample]
    arrays = [np.asarray(im.resize((size, size), method), dtype=np.uint8) for im in images]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return pixels.sub_(mean_t).div_(std_t)


def _open(path: Path) -> Image.Image:
    if not path.exists():
        raise ImageError(f"image not found: {path}")
    if path.is_dir():
        raise ImageError(f"expected an image file, got a directory: {path}")
    try:
        with warnings.catch_warnings():  # over MAX_IMAGE_PIXELS: check_pixels raises instead of PIL warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            check_pixels(im, path)  # from the header, before any pixel is decoded
            im.seek(0)  # animated images: first frame
            im.load()
            return im.copy()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"not an image or unsupported format: {path}") from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image too large (decompression bomb guard): {path}: {exc}") from None
    except PermissionError as exc:
        raise ImageError(f"cannot read image {path}: {exc.strerror or exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"corrupt or truncated image: {path}: {exc}") from None


def check_pixels(image: Image.Image, where: object = "image") -> None:
    """Refuse an image whose header claims more than PIL's ``Image.MAX_IMAGE_PIXELS`` (its decompression-bomb
    warning threshold; ``None`` turns the guard off): a one-line `ImageTooLargeError` instead of a warning
    followed by a multi-GB allocation."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit and width * height > limit:
        raise ImageTooLargeError(f"image too large: {where}: {width}x{height} pixels (at most {limit:,}; "
                                 f"raise PIL.Image.MAX_IMAGE_PIXELS to allow more)")


def _tensor_to_hwc(tensor: torch.Tensor) -> np.ndarray:
    array = tensor.detach().cpu()
    if array.ndim == 3 and array.shape[0] in (1, 3, 4):
        array = array.permute(1, 2, 0)  # tensors are CHW by torch convention
    if array.dtype == torch.bfloat16:
        array = array.float()
    return array.numpy()


def _from_array(array: np.ndarray) -> Image.Image:
    """HxW, HxWx1, HxWx3 or HxWx4 arrays; uint8 as is, floats in [0, 1] scaled to 0..255 and rounded."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ImageError(f"image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {tuple(array.shape)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"image array is empty: shape {tuple(array.shape)}")
    if array.dtype == np.uint8:
        pass
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise ImageError("float image arrays must hold finite values in [0, 1]")
        array = np.round(array * 255.0).astype(np.uint8)
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    else:
        raise ImageError(f"unsupported image array dtype {array.dtype} (use uint8 or float in [0, 1])")
    return Image.fromarray(np.ascontiguousarray(array))  # uint8 HxW / HxWx3 / HxWx4 -> L / RGB / RGBA


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa") or (
        image.mode == "P" and "transparency" in image.info)
