"""Image plumbing: loading and saving with Pillow, colour spaces with kornia, tensor conversions.

Conventions
-----------
* An image is a float tensor ``[3, H, W]`` (or batched ``[*B, 3, H, W]``) with sRGB values in ``[0, 1]``.
* :func:`load_image` reads every mode Pillow reads, applies the EXIF orientation and composites any
  alpha channel over **white** (``rgb · α + 1 · (1 − α)``), so a transparent logo reads as it looks on
  a page. Grey images are repeated over the three channels.
* :func:`save_image` writes PNG or JPEG atomically: the file appears complete or not at all.
* Colour spaces: ``"rgb"`` (sRGB, identity), ``"linear"`` (linear-light RGB) and ``"lab"`` (CIE L*a*b*,
  D65, L in [0, 100]), all through :mod:`kornia.color`.
* Sizes are ``(H, W)``; :func:`parse_size` reads the command-line form ``"W×H"`` (``"640x360"``).
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

__all__ = [
    "ImageError", "load_image", "save_image", "to_colorspace", "from_colorspace", "COLORSPACES",
    "image_to_points", "points_to_image", "resize", "resize_max", "parse_size", "MAX_SIZE", "side_by_side",
    "stack_rows", "is_grey",
]

COLORSPACES = ("rgb", "lab", "linear")
MAX_SIZE = 16384
_SAVE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
_WHITE = 1.0


class ImageError(ValueError):
    """An image file that cannot be read or written; the message names the path and the problem."""


def is_grey(image: Tensor) -> bool:
    """Whether the three channels of ``image [..., 3, H, W]`` are identical: a grey image, as :func:`load_image`
    returns greyscale files (texture synthesis and the texture network then work on one channel)."""
    if image.dim() < 3 or image.shape[-3] != 3:
        raise ValueError(f"expected an image [..., 3, H, W], got {tuple(image.shape)}")
    r, g, b = image.unbind(-3)
    return bool(torch.equal(r, g) and torch.equal(g, b))


# ----------------------------------------------------------------------------------------------- loading

def load_image(path: str | os.PathLike) -> Tensor:
    """Read an image file into a float32 tensor ``[3, H, W]`` with values in ``[0, 1]``.

    Every Pillow mode is accepted. Value scaling per mode:

    * 8-bit modes (``1, L, P, RGB, CMYK, YCbCr, …``): ``v / 255`` after Pillow's conversion to RGB/L;
    * ``I;16*`` (16-bit grey): ``v / 65535``;
    * ``I`` (32-bit int, how Pillow may hold 16-bit PNG/TIFF data): ``v / 65535`` when all values lie in
      ``[0, 65535]``, otherwise a min–max rescale to ``[0, 1]``;
    * ``F`` (32-bit float): kept when all values lie in ``[0, 1]``, otherwise min–max rescaled.

    The EXIF orientation is applied (``ImageOps.exif_transpose``); alpha (modes ``LA, La, RGBA, RGBa, PA``
    and palettes with transparency) is composited over white. Multi-frame files give their first frame.

    Raises:
        ImageError: missing file, a directory, a file Pillow cannot decode, or an image with a zero side.
    """
    p = Path(path)
    if not p.exists():
        raise ImageError(f"{p}: no such file")
    if p.is_dir():
        raise ImageError(f"{p}: is a directory, not an image file")
    try:
        with Image.open(p) as opened:
            opened.load()
            im = ImageOps.exif_transpose(opened)
            if im.width == 0 or im.height == 0:
                raise ImageError(f"{p}: image has zero size ({im.width}x{im.height})")
            array, alpha = _pil_to_array(im)
    except UnidentifiedImageError:
        raise ImageError(f"{p}: not an image file Pillow can read") from None
    except Image.DecompressionBombError as err:
        raise ImageError(f"{p}: image too large to decode safely ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        if isinstance(err, ImageError):
            raise
        raise ImageError(f"{p}: cannot decode image ({type(err).__name__}: {err})") from None
    return _array_to_tensor(array, alpha)


def _pil_to_array(im: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """``(values [H, W] or [H, W, 3] in [0, 1], alpha [H, W] in [0, 1] or None)`` as float32 arrays."""
    mode = im.mode
    if mode.startswith("I;16"):
        return np.asarray(im, dtype=np.float32) / 65535.0, None
    if mode == "I":
        values = np.asarray(im, dtype=np.float64)
        scaled = values / 65535.0 if values.min() >= 0 and values.max() <= 65535 else _min_max(values)
        return scaled.astype(np.float32), None
    if mode == "F":
        values = np.asarray(im, dtype=np.float64)
        scaled = values if values.min() >= 0 and values.max() <= 1 else _min_max(values)
        return scaled.astype(np.float32), None
    if _has_alpha(im):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
        return rgba[..., :3], rgba[..., 3]
    target = "L" if mode in ("1", "L") else "RGB"
    return np.asarray(im.convert(target), dtype=np.float32) / 255.0, None


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("LA", "La", "RGBA", "RGBa", "PA") or (im.mode in ("P", "L", "RGB")
                                                           and "transparency" in im.info)


def _min_max(values: np.ndarray) -> np.ndarray:
    """Rescale to ``[0, 1]``; a constant image maps to 0."""
    lo, hi = float(values.min()), float(values.max())
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ValueError("image contains NaN or infinite values")
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)


def _array_to_tensor(array: np.ndarray, alpha: np.ndarray | None) -> Tensor:
    """``[H, W]`` or ``[H, W, 3]`` array (+ alpha) → ``[3, H, W]`` float32 tensor composited over white."""
    img = torch.from_numpy(np.ascontiguousarray(array))
    img = img.unsqueeze(0).expand(3, -1, -1) if img.dim() == 2 else img.permute(2, 0, 1)
    if alpha is not None:
        a = torch.from_numpy(np.ascontiguousarray(alpha)).unsqueeze(0)
        img = img * a + _WHITE * (1.0 - a)
    return img.contiguous().clamp_(0.0, 1.0)


# ------------------------------------------------------------------------------------------------ saving

def save_image(image: Tensor, path: str | os.PathLike, *, quality: int = 95) -> Path:
    """Write ``image`` (``[3, H, W]``, ``[1, H, W]`` or ``[H, W]``, values in [0, 1]) as PNG or JPEG.

    The format follows the suffix (``.png``, ``.jpg``, ``.jpeg``, any case). Values are clamped to
    ``[0, 1]`` and rounded to uint8 (``round(255 · v)``). The write is atomic: Pillow writes a temporary
    file in the destination directory, which then replaces ``path`` with ``os.replace``; on any failure
    the temporary file is removed and ``path`` is left untouched. Returns the path written.

    Raises:
        ValueError: unsupported suffix, bad tensor (shape, non-float dtype, NaN).
        ImageError: the directory is missing or not writable, or the write failed.
    """
    p = Path(path)
    fmt = _SAVE_FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise ValueError(f"{p}: unsupported image suffix {p.suffix!r}; use one of {', '.join(_SAVE_FORMATS)}")
    pil = Image.fromarray(_to_uint8(image))
    options = {"quality": quality} if fmt == "JPEG" else {}
    directory = p.parent
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=directory)
    except OSError as err:
        raise ImageError(f"{p}: cannot write to directory {directory} ({err.strerror or err})") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            pil.save(handle, format=fmt, **options)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, _new_file_mode())
        os.replace(tmp_name, p)
    except BaseException as err:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise ImageError(f"{p}: write failed ({err})") from err
        raise
    return p


def _new_file_mode() -> int:
    """Permissions a plain ``open(path, "w")`` would give (``mkstemp`` creates files with 0600)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _to_uint8(image: Tensor) -> np.ndarray:
    """``[3, H, W] | [1, H, W] | [H, W]`` float tensor → ``[H, W, 3]`` or ``[H, W]`` uint8 array."""
    if not isinstance(image, Tensor):
        raise ValueError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if not image.is_floating_point():
        raise ValueError(f"image must be a float tensor with values in [0, 1], got dtype {image.dtype}; "
                         "for uint8 data use image.float() / 255")
    shape = tuple(image.shape)
    if not (image.dim() == 2 or (image.dim() == 3 and shape[0] in (1, 3))):
        raise ValueError(f"image must have shape [3, H, W], [1, H, W] or [H, W], got {shape}")
    if image.numel() == 0:
        raise ValueError(f"image must not be empty, got shape {shape}")
    values = image.detach().to("cpu", torch.float32)
    if torch.isnan(values).any():
        raise ValueError("image contains NaN values; refusing to save")
    values = (values.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    if values.dim() == 3:
        values = values[0] if values.shape[0] == 1 else values.permute(1, 2, 0)
    return values.contiguous().numpy()


# ---------------------------------------------------------------------------------------- colour spaces

def _check_space(space: str) -> str:
    if space not in COLORSPACES:
        raise ValueError(f"space must be one of {', '.join(map(repr, COLORSPACES))}, got {space!r}")
    return space


def _check_rgb_like(img: Tensor, name: str = "img") -> Tensor:
    if not isinstance(img, Tensor) or img.dim() < 3 or img.shape[-3] != 3:
        shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
        raise ValueError(f"{name} must be a tensor of shape [*, 3, H, W], got {shape}")
    if not img.is_floating_point():
        raise ValueError(f"{name} must be a float tensor, got dtype {img.dtype}")
    return img


def to_colorspace(img: Tensor, space: str) -> Tensor:
    """Convert sRGB ``img [*, 3, H, W]`` (values in [0, 1]) to ``space``.

    ``"rgb"``: identity; ``"linear"``: ``kornia.color.rgb_to_linear_rgb`` (inverse sRGB gamma);
    ``"lab"``: ``kornia.color.rgb_to_lab`` (D65, L ∈ [0, 100], a, b ≈ [−128, 127]). Differentiable.
    """
    import kornia.color as kc

    _check_rgb_like(img)
    space = _check_space(space)
    if space == "rgb":
        return img
    return kc.rgb_to_linear_rgb(img) if space == "linear" else kc.rgb_to_lab(img)


def from_colorspace(img: Tensor, space: str, *, clip: bool = True) -> Tensor:
    """Inverse of :func:`to_colorspace`: ``img [*, 3, H, W]`` in ``space`` → sRGB.

    With ``clip=True`` the result is clamped to [0, 1] (colours outside the sRGB gamut, which Lab and
    linear values can describe, are clipped).
    """
    import kornia.color as kc

    _check_rgb_like(img)
    space = _check_space(space)
    if space == "rgb":
        rgb = img
    elif space == "linear":
        rgb = kc.linear_rgb_to_rgb(img)
    else:
        rgb = kc.lab_to_rgb(img, clip=False)
    return rgb.clamp(0.0, 1.0) if clip else rgb


def image_to_points(img: Tensor) -> Tensor:
    """``[*B, C, H, W]`` → ``[*B, H·W, C]``: one row per pixel in row-major (raster) order."""
    if not isinstance(img, Tensor) or img.dim() < 3:
        raise ValueError(f"img must be a tensor of shape [*B, C, H, W] (at least 3 dims), got "
                         f"{tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__}")
    return img.flatten(-2).transpose(-1, -2)


def points_to_image(points: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`image_to_points`: ``[*B, H·W, C]`` → ``[*B, C, H, W]``."""
    if not isinstance(points, Tensor) or points.dim() < 2 or points.shape[-2] != height * width:
        shape = tuple(points.shape) if isinstance(points, Tensor) else type(points).__name__
        raise ValueError(f"points must have shape [*B, H·W, C] with H·W = {height}·{width} = "
                         f"{height * width}, got {shape}")
    return points.transpose(-1, -2).unflatten(-1, (height, width))


# ----------------------------------------------------------------------------------------------- sizes

def resize_max(img: Tensor, max_side: int) -> Tensor:
    """Downscale ``img [C, H, W]`` or ``[B, C, H, W]`` so that ``max(H, W) <= max_side``.

    The aspect ratio is kept (each side ``round(side · max_side / max(H, W))``, at least 1); the resize is
    antialiased bilinear. Images already small enough are returned unchanged (never upscaled).
    """
    if not isinstance(max_side, int) or max_side < 1:
        raise ValueError(f"max_side must be a positive int, got {max_side!r}")
    if not isinstance(img, Tensor) or img.dim() not in (3, 4):
        raise ValueError(f"img must have shape [C, H, W] or [B, C, H, W], got "
                         f"{tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__}")
    h, w = img.shape[-2:]
    if max(h, w) <= max_side:
        return img
    scale = max_side / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return resize(img, size)


def resize(img: Tensor, size: tuple[int, int]) -> Tensor:
    """Antialiased bilinear resize of ``[C, H, W]`` or ``[B, C, H, W]`` to exactly ``size = (H', W')``
    (returned unchanged when it already has that size)."""
    if not isinstance(img, Tensor) or img.dim() not in (3, 4):
        raise ValueError(f"img must have shape [C, H, W] or [B, C, H, W], got "
                         f"{tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__}")
    if len(size) != 2 or not all(isinstance(v, int) and v >= 1 for v in size):
        raise ValueError(f"size must be two positive ints (H, W), got {size!r}")
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    batched = img if img.dim() == 4 else img.unsqueeze(0)
    out = F.interpolate(batched, size=size, mode="bilinear", align_corners=False, antialias=True)
    return out if img.dim() == 4 else out.squeeze(0)


def parse_size(text: str | int) -> tuple[int, int]:
    """Parse a size flag into ``(H, W)``.

    ``"512"`` (or the int 512) → ``(512, 512)``; ``"640x360"`` is **width × height** as image tools write
    it, so it returns ``(360, 640)``. Each side must be an integer in ``[1, 16384]``.
    """
    raw = str(text).strip().lower()
    parts = raw.split("x")
    if len(parts) not in (1, 2) or not all(re.fullmatch(r"[0-9]+", part.strip()) for part in parts):
        raise ValueError(f"size must be N or WxH with positive integers (e.g. 512 or 640x360), got {text!r}")
    values = [int(part) for part in parts]
    if any(v < 1 or v > MAX_SIZE for v in values):
        raise ValueError(f"size sides must be between 1 and {MAX_SIZE}, got {text!r}")
    return (values[0], values[0]) if len(values) == 1 else (values[1], values[0])


# ---------------------------------------------------------------------------------------- comparisons

def side_by_side(images: list[Tensor], height: int | None = None, pad: int = 4) -> Tensor:
    """Lay images out left to right on a white canvas: ``[3, h + 2·pad, Σ w_i + (n + 1)·pad]``.

    Each image (``[3, H, W]``, ``[1, H, W]`` or ``[H, W]``, values in [0, 1]) is resized to the common
    height ``height`` (default: the largest input height) keeping its aspect ratio; ``pad`` white pixels
    surround every image. The canvas takes the device and dtype of the first image.
    """
    if not images:
        raise ValueError("images must be a non-empty list of tensors")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    rgb = [_as_rgb(img, f"images[{i}]") for i, img in enumerate(images)]
    ref = rgb[0]
    h = max(img.shape[-2] for img in rgb) if height is None else height
    if not isinstance(h, int) or h < 1:
        raise ValueError(f"height must be a positive int, got {height!r}")
    resized = [resize(img.to(ref), (h, max(1, round(img.shape[-1] * h / img.shape[-2])))) for img in rgb]
    width = sum(img.shape[-1] for img in resized) + (len(resized) + 1) * pad
    canvas = torch.full((3, h + 2 * pad, width), _WHITE, dtype=ref.dtype, device=ref.device)
    x = pad
    for img in resized:
        canvas[:, pad:pad + h, x:x + img.shape[-1]] = img.clamp(0.0, 1.0)
        x += img.shape[-1] + pad
    return canvas


def stack_rows(rows: list[Tensor]) -> Tensor:
    """Stack images ``[3, h_i, w_i]`` top to bottom, left-aligned on a white canvas ``[3, Σ h_i, max w_i]``
    (device and dtype of the first row)."""
    if not rows:
        raise ValueError("rows must be a non-empty list of tensors")
    rgb = [_as_rgb(row, f"rows[{i}]").to(rows[0]) for i, row in enumerate(rows)]
    width = max(row.shape[-1] for row in rgb)
    return torch.cat([torch.nn.functional.pad(row, (0, width - row.shape[-1]), value=_WHITE) for row in rgb], -2)


def _as_rgb(img: Tensor, name: str) -> Tensor:
    """``[3, H, W] | [1, H, W] | [H, W]`` float → ``[3, H, W]``."""
    if not isinstance(img, Tensor) or not img.is_floating_point():
        raise ValueError(f"{name} must be a float tensor")
    if img.dim() == 2:
        img = img.unsqueeze(0)
    if img.dim() != 3 or img.shape[0] not in (1, 3) or img.shape[1] == 0 or img.shape[2] == 0:
        raise ValueError(f"{name} must have shape [3, H, W], [1, H, W] or [H, W], got {tuple(img.shape)}")
    return img.expand(3, -1, -1)
