"""Patch projection (texture optimisation) of a synthesis onto its exemplar's patches.

The MW2 synthesis (:mod:`imgmw.texture`) matches the *statistics* of the exemplar's patches: colours, layout
and scale are right, but a stripe drawn by a mixture of a few Gaussians comes out smeared, a mortar joint
broken, and a fine grain stays on top. This stage keeps that layout and snaps the structure back, by the
texture optimisation of Kwatra, Essa, Bobick & Kwatra (2005, "Texture optimization for example-based
synthesis"): with ``R_j`` the ``p×p`` patch of ``x`` at grid position ``j`` (stride ``σ``) and ``E`` the set of
all ``p×p`` exemplar patches (stride 1), it lowers

    E(x) = Σ_j w_j ‖R_j x − z_j‖²,     z_j = argmin_{e ∈ E} ‖R_j x − e‖²,

alternating the two block minimisations:

* **match**: ``z_j`` = the nearest exemplar patch of every output patch (exact brute force, chunked:
  :func:`nearest_patches`);
* **aggregate**: ``x = (Σ_j w_j R_jᵀ z_j) / (Σ_j w_j R_jᵀ 1)``, every pixel the weighted mean of the matched
  patches that cover it, with Kwatra's iteratively re-weighted robust weights
  ``w_j = (‖R_j x − z_j‖² + ε)^{(r−2)/2}`` (``r = robust``; ``r = 2``: plain averaging).

Choices, measured with ``benchmarks/bench_structure.py`` (128×128 outputs from the left half of each bundled
texture): plain averaging (``r = 2``) and Kwatra's ``r = 0.8`` blur the overlaps (the stripes' and bricks'
edges soften, gravel turns to smooth shards); ``r = −4`` (weights ∝ distance⁻⁶, close to "the best-matched patch
wins") kept the edges, at equal cost. ``p = 8`` at stride 4 (each pixel in about four patches) scored as
stride 2 at a third of the time; ``p = 6`` reconnected fewer stripes. A Kaspar et al. (2015) style occurrence
penalty (dual ascent on how often each exemplar region is used) did not stop the wash-out below and raised
the patch sliced-W2 everywhere, so it is not here.

The known failure is the **wash-out**: a nearest 192-dimensional exemplar patch of a noisy or faint output
patch is usually a low-contrast one, so on stochastic textures (gravel), sparse bright details (galaxies)
and thin sparse lines (the veins) the projection drifts to the exemplar's commonest flat patches — which the
structure distance rewards and the patch sliced-W2 punishes; :func:`imgmw.texture.synthesize_texture` keeps
the projection only when the latter does not rise.

It runs coarse to fine on Gaussian pyramids (:func:`imgmw.patches.gaussian_pyramid`): the coarsest level
starts from the synthesis reduced to that level, every finer level from the synthesis's own level plus the
change the projection made one level up (a Laplacian-pyramid update). Each iteration shifts the patch grid by
a random offset (``generator``) so no fixed block grid shows; non-periodic grids keep every patch inside the
image (clamped starts), so an image made of exemplar patches is a fixed point.

Pieces: :func:`nearest_patches`, :func:`project_patches` (the iterations at one level), :func:`refine_texture`
(the pyramid), :func:`refine_n_scales`, :func:`resize_image`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .patches import gaussian_pyramid
from .validation import check_positive_int, single_image

__all__ = ["nearest_patches", "project_patches", "refine_texture", "resize_image", "refine_n_scales",
           "REFINE_PATCH", "REFINE_ITERS", "REFINE_STRIDE", "ROBUST"]

REFINE_PATCH = 8          # patch side p of the projection at every level
REFINE_ITERS = 3          # match/aggregate iterations per level
REFINE_STRIDE = 4         # grid stride σ: every pixel is covered by about (p/σ)² patches
ROBUST = -4.0             # robust exponent r: weights ∝ distance^(r−2), near winner-takes-all
REFINE_MIN_SIDE = 32      # the coarsest projection level keeps sides >= this (and >= 2p)
MAX_LEVELS = 3            # at most this many projection levels
PAIR_BUDGET = 1 << 23     # query × bank distances held at once (32 MB in float32)
STRIP_QUERIES = 4096      # output patches unfolded at once
MAX_ROBUST = 16           # robust >= -16: weights up to EPS^-9 = 1e54 stay finite in float64
EPS = 1e-6                # ε of the robust weights (squared distance, per patch)


@torch.no_grad()
def nearest_patches(queries: Tensor, bank: Tensor, *, bank_sq: Tensor | None = None,
                    budget: int = PAIR_BUDGET) -> tuple[Tensor, Tensor]:
    """Nearest neighbour in ``bank [M, D]`` of every row of ``queries [N, D]``, exact and chunked.

    ``argmin_m ‖q − b_m‖² = argmin_m (‖b_m‖² − 2 q·b_m)``, evaluated on blocks of ``⌊budget / M⌋`` queries (at
    least one), so at most ``max(budget, M)`` distances exist at a time whatever ``N``. ``bank_sq [M]``: the
    precomputed ``‖b_m‖²``.

    Returns:
        ``(index [N] long, squared distance ‖q − b_index‖² [N])``, the distance recomputed directly from the
        chosen pair (exactly 0 for a query that is a bank row).
    """
    if queries.dim() != 2 or bank.dim() != 2 or queries.shape[1] != bank.shape[1] or bank.shape[0] == 0:
        raise ValueError(f"queries [N, D] and a non-empty bank [M, D] must share D, got {tuple(queries.shape)} "
                         f"and {tuple(bank.shape)}")
    cost = bank.square().sum(1) if bank_sq is None else bank_sq
    block = max(1, budget // bank.shape[0])
    index = torch.cat([torch.addmm(cost, q, bank.T, alpha=-2.0).argmin(1) for q in queries.split(block)]) \
        if queries.shape[0] else torch.zeros(0, dtype=torch.long, device=queries.device)
    return index, (queries - bank[index]).square().sum(1)


def _grid(size: int, patch: int, stride: int, offset: int, periodic: bool, device: torch.device) -> Tensor:
    """Pixel indices ``[R·p]`` of the patches of one axis: ``R`` patch starts ``y_k`` every ``stride`` px shifted by
    ``offset ∈ [0, σ)``, each followed by its ``p`` pixels ``y_k, …, y_k + p − 1``.

    Periodic: ``y_k = offset + kσ`` for ``k < ⌈size/σ⌉``, pixels modulo ``size`` (patches wrap around). Otherwise
    ``y_k = clamp(offset − p + σ + kσ, 0, size − p)`` until the last start reaches ``size − p``: every patch lies
    inside the image (so an image made of exemplar patches is matched exactly) and every pixel is covered."""
    if periodic:
        starts = torch.arange(offset, offset + size, stride, device=device)
    else:
        last = size - patch
        first = offset - patch + stride            # <= 0 unless stride > (patch + 1) / 2: then start earlier
        first -= stride * -(-max(first, 0) // stride)
        count = max(1, -(-(last - first) // stride) + 1)
        starts = (first + stride * torch.arange(count, device=device)).clamp(0, last)
    pixels = starts[:, None] + torch.arange(patch, device=device)
    return (pixels % size if periodic else pixels).flatten()


@torch.no_grad()
def _project_once(x: Tensor, bank: Tensor, patch: int, stride: int, periodic: bool,
                  offset: tuple[int, int], robust: float) -> tuple[Tensor, Tensor]:
    """One match + aggregate step on ``x [1, C, H, W]`` against ``bank [M, D]``: ``(new x, energy)`` with
    ``energy = Σ_j ‖R_j x − z_j‖² / #patches``.

    The patches are gathered by index (:func:`_grid`): the pixel rows of a strip of patch rows and all the pixel
    columns give a ``[C, r·p, R_w·p]`` canvas whose non-overlapping ``p × p`` blocks are the patches; the matches
    are folded back into such a canvas and scattered onto the image with ``index_add_`` (sum of the weighted
    patches, channel ``C`` the sum of the weights)."""
    _, c, h, w = x.shape
    bank_sq = bank.square().sum(1)
    rows_idx = _grid(h, patch, stride, offset[0], periodic, x.device).view(-1, patch)    # [R_h, p]
    cols_idx = _grid(w, patch, stride, offset[1], periodic, x.device)                   # [R_w·p]
    n_cols = cols_idx.numel() // patch
    acc = torch.zeros(1, c + 1, h, w, dtype=torch.float64, device=x.device)   # weights up to EPS^((r−2)/2)
    energy = torch.zeros((), dtype=torch.float64, device=x.device)
    x_cols = x[:, :, :, cols_idx]                                                       # [1, C, H, R_w·p]
    for strip in rows_idx.split(max(1, STRIP_QUERIES // n_cols)):
        strip = strip.flatten()
        queries = F.unfold(x_cols[:, :, strip], patch, stride=patch)[0].T              # [n, C·p·p]
        index, sq = nearest_patches(queries, bank, bank_sq=bank_sq)
        weight = (sq.double() + EPS).pow((robust - 2.0) / 2.0)[:, None].to(acc)           # [n, 1]
        energy += sq.sum(dtype=torch.float64)
        blocks = torch.cat([bank[index].to(acc) * weight, weight.expand(-1, patch * patch)], 1)
        canvas = F.fold(blocks.T[None], (strip.numel(), cols_idx.numel()), patch, stride=patch)
        acc.index_add_(2, strip, torch.zeros(1, c + 1, strip.numel(), w, dtype=acc.dtype, device=x.device)
                       .index_add_(3, cols_idx, canvas))
    return (acc[:, :c] / acc[:, c:]).to(x.dtype), energy / (rows_idx.shape[0] * n_cols)


@torch.no_grad()
def project_patches(image: Tensor, exemplar: Tensor, *, patch: int = REFINE_PATCH, n_iter: int = REFINE_ITERS,
                    stride: int = REFINE_STRIDE, robust: float = ROBUST, periodic: bool = False,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``n_iter`` texture-optimisation iterations (module docstring) of ``image [1, C, H, W]`` against every
    ``patch × patch`` patch of ``exemplar [1, C, h, w]`` at one scale.

    ``periodic``: the output's patches wrap around (a tileable result stays tileable); the exemplar is never
    treated as periodic. ``generator`` draws the grid offsets ``[0, stride)²`` of every iteration (on its device).

    Returns:
        ``(image [1, C, H, W], energy [n_iter])``: the projected image and the mean squared patch distance
        ``‖R_j x − z_j‖²`` of each iteration's matches.
    """
    x, u = single_image(image, "image"), single_image(exemplar, "exemplar")
    check_positive_int("patch", patch)
    check_positive_int("n_iter", n_iter)
    check_positive_int("stride", stride)
    if stride > patch:
        raise ValueError(f"stride {stride} must be at most the patch side {patch} (else pixels are left uncovered)")
    if not (isinstance(robust, (int, float)) and -MAX_ROBUST <= robust <= 2):
        raise ValueError(f"robust must be in [-{MAX_ROBUST}, 2], got {robust!r}")
    if x.shape[1] != u.shape[1]:
        raise ValueError(f"image and exemplar must have the same channels, got {x.shape[1]} and {u.shape[1]}")
    if min(u.shape[-2:]) < patch or min(x.shape[-2:]) < 2:
        raise ValueError(f"the exemplar ({u.shape[-2]}x{u.shape[-1]}) must hold a {patch}x{patch} patch and the "
                         f"image ({x.shape[-2]}x{x.shape[-1]}) at least 2x2 pixels")
    u = u.to(x)
    bank = F.unfold(u, patch)[0].T.contiguous()                                   # [M, C·p·p], stride 1
    device = generator.device if generator is not None else torch.device("cpu")
    offsets = torch.randint(stride, (n_iter, 2), generator=generator, device=device).tolist()  # one read, up front
    energies = []
    for oy, ox in offsets:
        x, energy = _project_once(x, bank, patch, stride, periodic, (oy, ox), robust)
        energies.append(energy)
    return x, torch.stack(energies)


def refine_n_scales(exemplar_hw: tuple[int, int], output_hw: tuple[int, int], patch: int = REFINE_PATCH) -> int:
    """Projection levels: the most (at most ``MAX_LEVELS``) whose coarsest level keeps the sides of both
    images ``>= max(REFINE_MIN_SIDE, 2·patch)``; at least 1."""
    side = min(*exemplar_hw, *output_hw)
    need = max(REFINE_MIN_SIDE, 2 * patch)
    levels = 1
    while levels < MAX_LEVELS and side >> levels >= need:
        levels += 1
    return levels


def _upsample(x: Tensor, shape: tuple[int, int], periodic: bool) -> Tensor:
    """``x [B, C, h, w]`` resized bilinearly to ``shape`` (not clamped); periodic images wrap (one pixel of
    circular padding), so a tileable image stays tileable."""
    if not periodic:
        return F.interpolate(x, size=shape, mode="bilinear", align_corners=False)
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="circular")
    big = F.interpolate(padded, scale_factor=(shape[0] / h, shape[1] / w), mode="bilinear", align_corners=False)
    top, left = round(shape[0] / h), round(shape[1] / w)
    return big[..., top:top + shape[0], left:left + shape[1]]


def resize_image(image: Tensor, shape: tuple[int, int], periodic: bool) -> Tensor:
    """``image [C, h, w]`` resized to ``shape`` bilinearly and clamped to [0, 1]; periodic images wrap (one pixel
    of circular padding), so a tileable image stays tileable."""
    return _upsample(image[None], shape, periodic)[0].clamp(0, 1)


@torch.no_grad()
def refine_texture(image: Tensor, exemplar: Tensor, *, patch: int = REFINE_PATCH, n_iter: int = REFINE_ITERS,
                   n_scales: int | None = None, stride: int = REFINE_STRIDE, robust: float = ROBUST,
                   periodic: bool = False,
                   generator: torch.Generator | None = None) -> Tensor:
    """Project a synthesis ``image [3, H, W]`` onto the patches of ``exemplar [3, h, w]``, coarse to fine.

    Level ``s`` (sides divided by ``2^s``) of both Gaussian pyramids (:func:`imgmw.patches.gaussian_pyramid`)
    gets ``n_iter`` iterations of :func:`project_patches`; the coarsest level starts from the image's own
    level, each finer level from the image's own level plus the change made at the coarser one,
    ``x_s + up(y_{s+1}) − up(x_{s+1})`` (a Laplacian-pyramid update: the refined layout keeps the image's fine
    detail, and an image made of exemplar patches stays fixed; ``up`` bilinear). ``n_scales``
    default: :func:`refine_n_scales`. The result has the image's size, dtype and device, clamped to [0, 1].

    Cost per iteration at a level: ``(H·W/σ²)·(h·w)·3p²`` multiply-adds (exact search over every exemplar
    position); memory ``O(h·w·3p² + H·W)`` — the distances are chunked (:data:`PAIR_BUDGET`) and the output
    patches unfolded in strips (:data:`STRIP_QUERIES`), so a 2048×2048 output needs no more than a 256×256 one
    beyond its own canvas.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> exemplar = torch.rand(3, 48, 48, generator=g)
        >>> out = refine_texture(exemplar, exemplar, n_iter=1, generator=g)   # an exemplar is a fixed point
        >>> bool((out - exemplar).abs().max() < 1e-5)
        True
    """
    x, u = single_image(image, "image"), single_image(exemplar, "exemplar")
    if x.shape[1] != u.shape[1]:
        raise ValueError(f"image and exemplar must have the same channels, got {x.shape[1]} and {u.shape[1]}")
    check_positive_int("patch", patch)
    if n_scales is None:
        n_scales = refine_n_scales((u.shape[-2], u.shape[-1]), (x.shape[-2], x.shape[-1]), patch)
    check_positive_int("n_scales", n_scales)
    for name, img in (("image", x), ("exemplar", u)):
        if min(img.shape[-2:]) >> (n_scales - 1) < max(patch, 3 if n_scales > 1 else 1):
            raise ValueError(f"the {name} ({img.shape[-2]}x{img.shape[-1]}) is too small for {patch}x{patch} "
                             f"patches at {n_scales} level(s); use fewer n_scales or a smaller patch")
    u = u.to(x)
    levels_x = gaussian_pyramid(x, n_scales, periodic=periodic)
    levels_u = gaussian_pyramid(u, n_scales)
    out = levels_x[-1]
    for s in reversed(range(n_scales)):
        if s < n_scales - 1:  # the image's own detail at this level, on the refined coarser level
            shape = (levels_x[s].shape[-2], levels_x[s].shape[-1])
            out = (levels_x[s] + _upsample(out, shape, periodic) - _upsample(levels_x[s + 1], shape, periodic))
            out = out.clamp(0, 1)
        out, _ = project_patches(out, levels_u[s], patch=patch, n_iter=n_iter, stride=stride, robust=robust,
                                 periodic=periodic, generator=generator)
    return out[0].clamp(0, 1).contiguous()

