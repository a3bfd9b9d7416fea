"""Decode and validate any user image into HWC uint8 RGB.

Accepts a path (str or Path), a PIL image or a numpy array; applies the EXIF orientation; converts
grayscale, palette, RGBA (composited on white), CMYK and 16-bit images to 8-bit RGB. Every failure is an
`ImageError` whose message names the input and what was wrong with it.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ovseg.core.errors import ImageError

# 12000x9000 (108 MP) is refused by default: the engine's maps are kept at image size and a few concepts of
# float32 maps at that size take gigabytes. Override with OVSEG_MAX_PIXELS or the `max_pixels` argument.
DEFAULT_MAX_PIXELS = 50_000_000
MIN_SIDE = 8


def max_pixels_default() -> int:
    value = os.environ.get("OVSEG_MAX_PIXELS")
    if value is None:
        return DEFAULT_MAX_PIXELS
    try:
        return int(value)
    except ValueError:
        raise ImageError(f"OVSEG_MAX_PIXELS must be a whole number of pixels, got {value!r}") from None


def load_image(image, max_pixels: int | None = None, name: str | None = None) -> np.ndarray:
    """Return the image as an HxWx3 uint8 RGB array (C-contiguous).

    Args:
        image: a path to an image file, a `PIL.Image.Image`, or a numpy array HxW, HxWx1, HxWx3 or HxWx4
            (uint8 in [0, 255], uint16 in [0, 65535], or float in [0, 1]).
        max_pixels: refuse images with more pixels than this (default `DEFAULT_MAX_PIXELS`, or the
            environment variable OVSEG_MAX_PIXELS).
        name: how error messages name the image (default: its path), e.g. the file name a user uploaded.
    """
    limit = max_pixels_default() if max_pixels is None else int(max_pixels)
    if isinstance(image, (str, Path)):
        return _from_path(Path(image), limit, name)
    if isinstance(image, Image.Image):
        name = name or "the image"
        _check_size(image.size, limit, name)
        try:
            return _pil_to_rgb(image, name)
        except (OSError, SyntaxError, ValueError) as exc:
            if isinstance(exc, ImageError):
                raise
            raise ImageError(f"{name}: the image data is corrupt or truncated ({exc})") from None
    if isinstance(image, np.ndarray):
        return _from_array(image, limit)
    raise ImageError(f"expected an image path, a PIL image or a numpy array, got {type(image).__name__}")


def _from_path(path: Path, limit: int, name: str | None = None) -> np.ndarray:
    name = name or str(path)
    if not path.exists():
        raise ImageError(f"{name}: no such file")
    if path.is_dir():
        raise ImageError(f"{name}: is a folder, not an image file")
    if path.stat().st_size == 0:
        raise ImageError(f"{name}: the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit decides; PIL's bomb warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                _check_size(im.size, limit, name)
                im.load()
                return _pil_to_rgb(im, name)
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f" ({int(found.group(1)) / 1e6:.0f} MP)" if found else ""
        raise ImageError(
            f"{name}: image{size} is above {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} MP, which PIL refuses to decode "
            "(its decompression-bomb guard, beyond OVSEG_MAX_PIXELS); downscale it"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file PIL can read (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"{name}: the image data is corrupt or truncated ({exc})") from None


def _check_size(size: tuple[int, int], limit: int, name: str) -> None:
    w, h = size
    if w < MIN_SIDE or h < MIN_SIDE:
        raise ImageError(f"{name}: image is {w}x{h}; each side must be at least {MIN_SIDE} pixels")
    if w * h > limit:
        raise ImageError(
            f"{name}: image is {w}x{h} ({w * h / 1e6:.1f} MP), above the limit of {limit / 1e6:.0f} MP; "
            "downscale it, or raise the limit with OVSEG_MAX_PIXELS"
        )


def _pil_to_rgb(im: Image.Image, name: str) -> np.ndarray:
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block must not lose the picture itself
        pass
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.int64)
        peak = 65535 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255
        gray = np.clip(arr * (255.0 / peak), 0, 255).round().astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        gray = ((arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ImageError(f"{name}: could not convert image mode {mode} to RGB")
    return np.ascontiguousarray(rgb)


def _from_array(arr: np.ndarray, limit: int) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ImageError(f"the array has shape {arr.shape}; expected HxW, HxWx1, HxWx3 or HxWx4")
    _check_size((arr.shape[1], arr.shape[0]), limit, "the array")
    if arr.dtype == np.uint8:
        out = arr
    elif arr.dtype == np.uint16:
        out = (arr.astype(np.float32) * (255.0 / 65535.0)).round().astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageError("the array holds NaN or infinite values")
        if arr.min() < 0 or arr.max() > 1:
            raise ImageError(
                f"a float array must hold values in [0, 1], got [{arr.min():.3g}, {arr.max():.3g}]"
            )
        out = (arr * 255.0).round().astype(np.uint8)
    elif arr.dtype == np.bool_:
        out = arr.astype(np.uint8) * 255
    else:
        raise ImageError(f"unsupported array dtype {arr.dtype}; use uint8, uint16 or float in [0, 1]")
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=2)
    elif out.shape[2] == 4:
        alpha = out[..., 3:4].astype(np.float32) / 255.0
        out = (out[..., :3].astype(np.float32) * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)
    return np.ascontiguousarray(out)


def pixel_key(rgb: np.ndarray) -> str:
    """A short content hash of decoded pixels (sha1, 16 hex digits): which cross-fitting fold an image belongs
    to, for the calibrations fitted on held-out images (`fused`, Concept Mask's verification)."""
    import hashlib

    return hashlib.sha1(np.ascontiguousarray(rgb).tobytes()).hexdigest()[:16]
