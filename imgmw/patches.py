"""Patch extraction and Gaussian pyramids for ``[B, C, H, W]`` images.

A ``p×p`` patch at top-left position ``(r, c)`` is the vector ``x[:, r:r+p, c:c+p]`` flattened in
channel-major order ``(channel, row, column)``, i.e. of length ``C·p·p`` — the order of
``torch.nn.functional.unfold``. Positions are numbered in raster order over the grid of valid top-left
corners: ``(H − p + 1) × (W − p + 1)`` of them, or ``H × W`` in *periodic* mode, where the image wraps
around (patches crossing the right/bottom border continue at the left/top), as a tileable texture does.

Everything here is differentiable with respect to the image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["extract_patches", "gather_patches", "random_patches", "patch_grid", "patch_coverage",
           "coverage_scaled", "gaussian_pyramid", "n_scales_for"]


def _check_image(img: Tensor, patch: int) -> tuple[int, int, int, int]:
    """Validate ``img [B, C, H, W]`` and ``patch``; return the shape."""
    if not isinstance(img, Tensor) or img.dim() != 4:
        shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
        raise ValueError(f"img must be a tensor of shape [B, C, H, W], got {shape}; "
                         "add a batch dim with img.unsqueeze(0)")
    if not isinstance(patch, int) or patch < 1:
        raise ValueError(f"patch must be a positive int, got {patch!r}")
    b, c, h, w = img.shape
    if h < patch or w < patch:
        raise ValueError(f"image of size {h}x{w} (HxW) is smaller than the patch size {patch}x{patch}; "
                         "use a larger image or a smaller patch")
    return b, c, h, w


def patch_grid(height: int, width: int, patch: int, periodic: bool = False) -> tuple[int, int]:
    """Number of top-left positions ``(rows, cols)``: ``(H − p + 1, W − p + 1)``, or ``(H, W)`` if periodic."""
    return (height, width) if periodic else (height - patch + 1, width - patch + 1)


def patch_coverage(height: int, width: int, patch: int, periodic: bool = False, *,
                   device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """How many ``p×p`` patches hold each pixel, relative to an interior pixel: ``[H, W]`` in ``(0, 1]``.

    Along an axis of length ``n`` pixel ``i`` lies in ``min(i + 1, n − i, p, n − p + 1)`` of the valid patch
    positions, an interior one in ``min(p, n − p + 1)``; the map is the outer product of the two axes' ratios
    (a corner pixel: ``1/p²``). All ones when ``periodic`` (every pixel lies in ``p²`` patches)."""
    if periodic:
        return torch.ones(height, width, device=device, dtype=dtype)
    if min(height, width) < patch:
        raise ValueError(f"a {height}x{width} image holds no {patch}x{patch} patch")

    def axis(n: int) -> Tensor:
        i = torch.arange(n, device=device)
        full = min(patch, n - patch + 1)
        return torch.minimum(torch.minimum(i + 1, n - i), torch.tensor(full, device=device)).to(dtype) / full

    return axis(height)[:, None] * axis(width)[None, :]


def coverage_scaled(x: Tensor, patch: int, periodic: bool = False) -> Tensor:
    """``x [..., H, W]`` with its values and its gradient scaled per pixel by :func:`patch_coverage`:
    ``x·c + sg(x)·(1 − c)`` (``sg``: stop-gradient; the values of ``x`` up to one rounding). A per-pixel loss of it
    then pulls each pixel as strongly as a loss over all ``p×p`` patches does: a border pixel lies in fewer
    patches (a corner in one of ``p²``), so unscaled such a loss outweighs the patch terms there. ``x`` itself
    when ``periodic``."""
    if periodic:
        return x
    c = patch_coverage(x.shape[-2], x.shape[-1], patch, device=x.device, dtype=x.dtype)
    return x * c + x.detach() * (1 - c)


def extract_patches(img: Tensor, patch: int, stride: int = 1, periodic: bool = False) -> Tensor:
    """All ``patch×patch`` patches of ``img [B, C, H, W]`` → ``[B, N, C·p·p]``.

    Top-left corners run over ``r = 0, s, 2s, …`` (likewise ``c``) with ``s = stride``:
    ``N = (⌊(H − p)/s⌋ + 1)·(⌊(W − p)/s⌋ + 1)``; in periodic mode the image is circularly padded by
    ``p − 1`` on the bottom and right, so ``N = ⌈H/s⌉·⌈W/s⌉`` (``H·W/s²`` when ``s`` divides both sides).
    Memory is ``B·N·C·p²`` elements; use :func:`random_patches` for a subset on large images.
    """
    _check_image(img, patch)
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int, got {stride!r}")
    if periodic and patch > 1:
        img = F.pad(img, (0, patch - 1, 0, patch - 1), mode="circular")
    return F.unfold(img, kernel_size=patch, stride=stride).transpose(1, 2)


def gather_patches(img: Tensor, patch: int, positions: Tensor, periodic: bool = False, *,
                   check_input: bool = True) -> Tensor:
    """Patches at flat grid ``positions [n]`` (raster indices over :func:`patch_grid`) → ``[B, n, C·p·p]``.

    Built by index arithmetic, without materialising all patches: position ``k`` has top-left corner
    ``(r, c) = (k // cols, k % cols)`` and pixel ``(i, j)`` of the patch is ``x[r + i, c + j]`` (taken
    modulo ``(H, W)`` when periodic). Row ``m`` equals row ``positions[m]`` of
    ``extract_patches(img, patch, 1, periodic)``. ``check_input=False`` skips the range check of the positions
    (the one check that needs a host synchronisation), for positions drawn in range by the caller.
    """
    b, c, h, w = _check_image(img, patch)
    rows, cols = patch_grid(h, w, patch, periodic)
    positions = torch.as_tensor(positions, device=img.device)
    if positions.dim() != 1 or positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise ValueError(f"positions must be a 1-D integer tensor, got shape {tuple(positions.shape)} "
                         f"and dtype {positions.dtype}")
    if check_input and positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= rows * cols):
        raise ValueError(f"positions must lie in [0, {rows * cols}) for a {h}x{w} image with {patch}x{patch} "
                         f"patches (periodic={periodic})")
    offsets = torch.arange(patch, device=img.device)
    r = (positions // cols)[:, None, None] + offsets[None, :, None]             # [n, p, 1]
    q = (positions % cols)[:, None, None] + offsets[None, None, :]              # [n, 1, p]
    if periodic:
        r, q = r % h, q % w
    flat = (r * w + q).reshape(-1)                                              # [n·p·p]
    values = img.flatten(2).index_select(2, flat)                               # [B, C, n·p·p]
    return values.reshape(b, c, -1, patch * patch).transpose(1, 2).reshape(b, -1, c * patch * patch)


def random_patches(img: Tensor, patch: int, n: int, generator: torch.Generator | None = None,
                   periodic: bool = False) -> Tensor:
    """``n`` distinct random patch positions of ``img [B, C, H, W]`` → ``[B, n, C·p·p]``.

    Positions are drawn uniformly without replacement from the :func:`patch_grid` (shared by all batch
    elements) with ``generator`` (whose device is used for the draw; default: the global CPU RNG), then
    gathered with :func:`gather_patches`. Differentiable with respect to ``img``.
    """
    _, _, h, w = _check_image(img, patch)
    rows, cols = patch_grid(h, w, patch, periodic)
    if not isinstance(n, int) or not 1 <= n <= rows * cols:
        raise ValueError(f"n must be an int in [1, {rows * cols}] (the number of patch positions of a "
                         f"{h}x{w} image with {patch}x{patch} patches, periodic={periodic}), got {n!r}")
    device = generator.device if generator is not None else torch.device("cpu")
    positions = torch.randperm(rows * cols, generator=generator, device=device)[:n]
    return gather_patches(img, patch, positions.to(img.device), periodic)


def n_scales_for(height: int, width: int, min_side: int = 16) -> int:
    """Number of pyramid levels whose smaller side stays ``>= min_side``: the largest ``S >= 1`` with
    ``⌊min(H, W) / 2^(S−1)⌋ >= min_side`` (1 when the image itself is smaller than ``min_side``)."""
    if min(height, width) < 1 or min_side < 1:
        raise ValueError(f"height, width and min_side must be >= 1, got {height}, {width}, {min_side}")
    side, scales = min(height, width) // 2, 1
    while side >= min_side:
        side, scales = side // 2, scales + 1
    return scales


def gaussian_pyramid(img: Tensor, n_scales: int, periodic: bool = False) -> list[Tensor]:
    """``[x_0 = img, x_1, …, x_{S−1}]`` with ``x_{s+1} = pyrdown(x_s)`` (sides ``⌊side/2⌋``).

    ``pyrdown`` is kornia's: a 5×5 binomial blur ``[1, 4, 6, 4, 1]²/256`` then bilinear resampling to
    ``⌊side/2⌋`` (for an even side: the mean of each 2×2 block of the blurred image). The blur pads by
    reflection, or circularly when ``periodic`` so that every level tiles when the input does (exactly
    so when each level's sides are even, i.e. ``H`` and ``W`` divisible by ``2^(S−1)``). Raises
    ValueError when a level to be blurred is smaller than the blur's padding allows (3×3, or 2×2 when
    periodic).
    """
    from kornia.geometry.transform import pyrdown

    if not isinstance(img, Tensor) or img.dim() != 4:
        shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
        raise ValueError(f"img must be a tensor of shape [B, C, H, W], got {shape}")
    if not isinstance(n_scales, int) or n_scales < 1:
        raise ValueError(f"n_scales must be a positive int, got {n_scales!r}")
    h, w = img.shape[-2:]
    # The blur pads by 2: the input of each pyrdown needs sides >= 3 (reflect) or >= 2 (circular).
    need = 2 if periodic else 3
    if n_scales > 1 and min(h, w) >> (n_scales - 2) < need:
        raise ValueError(f"n_scales={n_scales} is too many for a {h}x{w} image (every level but the "
                         f"last needs sides >= {need}); use n_scales_for(h, w) to choose it")
    border = "circular" if periodic else "reflect"
    levels = [img]
    for _ in range(n_scales - 1):
        levels.append(pyrdown(levels[-1], border_type=border))
    return levels
