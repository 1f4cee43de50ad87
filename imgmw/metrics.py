"""Evaluation metrics for the apps' ``metrics.json``: colour distances, SSIM, patch statistics, seams.

Every metric returns a Python ``float`` (or a dict of floats), is computed without gradient in float64
(except SSIM, computed by kornia in the input dtype), and is deterministic for a given ``seed``: random
subsets and projection directions come from CPU generators seeded with ``seed``, so the same inputs give
the same number on any device.

Point sets are ``[N, D]`` tensors; where a function says "points or image", an image ``[C, H, W]`` is
read as its ``H·W`` pixel colours (``imgmw.image.image_to_points``).

Definitions (``P`` projection directions ``θ_1..θ_P`` uniform on the unit sphere):

* sliced W2: ``SW2(X, Y) = sqrt( (1/P) Σ_p (1/m) Σ_i (sort(Xθ_p)_i − sort(Yθ_p)_i)² )`` for two sets of
  ``m`` points each — the square root of the average over directions of the squared 1-D W2 distances.
* exact W2: ``W2(X, Y) = sqrt( min_{π ∈ Π(1/n, 1/m)} Σ_ij π_ij ‖x_i − y_j‖² )`` (POT's ``ot.emd2``).
* Gaussian W2: ``sqrt(‖m_X − m_Y‖² + tr(Σ_X + Σ_Y − 2 (Σ_X^½ Σ_Y Σ_X^½)^½))`` with empirical means and
  (1/N) covariances.
"""
from __future__ import annotations

import math
from typing import Literal, overload

import torch
from torch import Tensor

from .image import image_to_points
from .patches import gather_patches, gaussian_pyramid, n_scales_for, patch_grid, random_patches

__all__ = ["random_directions", "sliced_w2", "weighted_sliced_w2", "nearest_patch_rms", "structure_distance",
           "near_copy_fraction", "STRUCTURE_PATCH", "COPY_RATIO", "color_sliced_w2", "color_w2_exact",
           "gaussian_color_w2", "luminance_ssim", "false_edges", "false_edge_map", "patch_sliced_w2", "seam_energy",
           "EDGE_THRESHOLD"]

STRUCTURE_PATCH = 15   # structure_distance: side of the compared patches (large enough to see veins and stripes)
COPY_RATIO = 0.1       # near_copy_fraction: a patch within this fraction of its own contrast of an exemplar patch
EDGE_THRESHOLD = 0.03  # false_edges: a luminance gradient above this (L*/100 per pixel, Sobel) is an edge


# ---------------------------------------------------------------------------------------------- helpers

def _generator(seed: int) -> torch.Generator:
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return torch.Generator().manual_seed(seed)


def _positive_int(name: str, value: int) -> int:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _as_points(x: Tensor, name: str) -> Tensor:
    """``[N, D]`` points, or an image ``[C, H, W]`` read as ``[H·W, C]`` colours; float64, finite."""
    if not isinstance(x, Tensor) or x.dim() not in (2, 3):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be points [N, D] or an image [C, H, W], got {shape}")
    points = (image_to_points(x) if x.dim() == 3 else x).detach().to(torch.float64)
    if points.shape[0] < 1 or points.shape[1] < 1:
        raise ValueError(f"{name} must hold at least one point of dimension >= 1, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(points).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return points


def _check_same_dim(a: Tensor, b: Tensor) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"a and b must have the same point dimension, got {a.shape[-1]} and {b.shape[-1]}")


def _check_image(img: Tensor, name: str) -> Tensor:
    if not isinstance(img, Tensor) or img.dim() != 3 or img.shape[0] != 3:
        shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
        raise ValueError(f"{name} must be an RGB image tensor [3, H, W], got {shape}")
    if not img.is_floating_point() or not bool(torch.isfinite(img).all()):
        raise ValueError(f"{name} must be a finite float tensor, got dtype {img.dtype}")
    return img


def _subsample(x: Tensor, m: int, generator: torch.Generator) -> Tensor:
    """``m`` rows of ``x [N, D]`` drawn without replacement (all rows, in order, when ``m >= N``)."""
    if m >= x.shape[0]:
        return x
    return x[torch.randperm(x.shape[0], generator=generator)[:m].to(x.device)]


# ------------------------------------------------------------------------------------- sliced Wasserstein

def random_directions(n_proj: int, dim: int, seed: int = 0, *, device: torch.device | str | None = None,
                      dtype: torch.dtype = torch.float64) -> Tensor:
    """``[n_proj, dim]`` unit vectors, uniform on the sphere (normalised Gaussians), drawn on the CPU from
    ``seed`` so that they do not depend on the device."""
    _positive_int("n_proj", n_proj)
    _positive_int("dim", dim)
    g = _generator(seed)
    theta = torch.randn(n_proj, dim, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=1, keepdim=True)
    return theta.to(device=device, dtype=dtype)


def sliced_w2(x: Tensor, y: Tensor, directions: Tensor) -> Tensor:
    """Sliced W2 between equal-size sets ``x, y [m, D]`` along ``directions [P, D]`` (0-dim tensor).

    ``SW2 = sqrt( mean_p mean_i (sort(x θ_p)_i − sort(y θ_p)_i)² )`` — the distance, not its square.
    Differentiable (sorting is piecewise linear).
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape != y.shape:
        raise ValueError(f"x and y must be [m, D] with the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if directions.dim() != 2 or directions.shape[1] != x.shape[1]:
        raise ValueError(f"directions must have shape [P, {x.shape[1]}], got {tuple(directions.shape)}")
    if not bool(torch.isfinite(x).all() & torch.isfinite(y).all()):
        raise ValueError("x and y must be finite (no NaN or inf)")
    px = torch.sort(directions @ x.T, dim=1).values                             # [P, m]
    py = torch.sort(directions @ y.T, dim=1).values
    return (px - py).square().mean().sqrt()


def weighted_sliced_w2(x: Tensor, y: Tensor, directions: Tensor, *, x_weight: Tensor | None = None,
                       y_weight: Tensor | None = None, n_quantiles: int = 256) -> Tensor:
    """Sliced W2 between weighted sets ``x [m, D]`` and ``y [n, D]`` (sizes may differ) along ``directions [P, D]``.

    Along each direction ``θ`` the 1-D distance is ``W2² = ∫₀¹ (F_x⁻¹(t) − F_y⁻¹(t))² dt`` between the
    weighted distributions of ``x θ`` and ``y θ`` (weights ``[m]``, ``[n]``, uniform when ``None``), estimated at
    the ``Q = n_quantiles`` midpoints ``t_j = (j + ½)/Q``, with ``F⁻¹(t)`` the smallest projected value whose
    cumulative weight reaches ``t``. Returns ``sqrt(mean_θ W2²)`` (a 0-dim tensor). With uniform weights and
    ``m = n = Q`` this is :func:`sliced_w2` exactly. A weighted palette (distinct colours with pixel counts)
    thus stands for its image at the cost of ``O(P (m log m + Q log m))``.
    """
    _positive_int("n_quantiles", n_quantiles)
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1] or directions.dim() != 2 \
            or directions.shape[1] != x.shape[1]:
        raise ValueError(f"x [m, D], y [n, D] and directions [P, D] must share D, got {tuple(x.shape)}, "
                         f"{tuple(y.shape)} and {tuple(directions.shape)}")
    t = (torch.arange(n_quantiles, dtype=x.dtype, device=x.device) + 0.5) / n_quantiles

    def quantiles(points: Tensor, weight: Tensor | None) -> Tensor:
        w = torch.ones(points.shape[0], dtype=points.dtype, device=points.device) if weight is None else weight
        values, order = torch.sort(directions.to(points) @ points.T, dim=1)       # [P, m]
        cum = (w.to(points) / w.sum())[order].cumsum(1)
        idx = torch.searchsorted(cum, t.expand(cum.shape[0], -1).contiguous()).clamp_max(points.shape[0] - 1)
        return values.gather(1, idx)                                             # [P, Q]

    return (quantiles(x, x_weight) - quantiles(y, y_weight)).square().mean().sqrt()


def color_sliced_w2(a: Tensor, b: Tensor, n_proj: int = 128, n_samples: int = 20000, seed: int = 0) -> float:
    """Sliced W2 distance (not squared) between two colour sets (points ``[N, D]`` or images ``[C, H, W]``).

    Both sets are subsampled without replacement (generator seeded with ``seed``) to the common count
    ``m = min(n_samples, N_a, N_b)`` (a set of exactly ``m`` points is used whole), projected on
    ``random_directions(n_proj, D, seed)`` and compared with :func:`sliced_w2`. Subsampling adds a small
    positive bias: two different subsamples of one large image are at a distance of order ``m^(-1/2)``.
    """
    _positive_int("n_proj", n_proj)
    _positive_int("n_samples", n_samples)
    xa, xb = _as_points(a, "a"), _as_points(b, "b")
    _check_same_dim(xa, xb)
    g = _generator(seed)
    m = min(n_samples, xa.shape[0], xb.shape[0])
    xa, xb = _subsample(xa, m, g), _subsample(xb, m, g)
    theta = random_directions(n_proj, xa.shape[1], seed, device=xa.device)
    return float(sliced_w2(xa, xb, theta))


# ----------------------------------------------------------------------------------------- exact and Gaussian

def color_w2_exact(a: Tensor, b: Tensor, n_samples: int = 2000, seed: int = 0) -> float:
    """Exact W2 distance (not squared) between uniform measures on seeded subsamples of ``a`` and ``b``.

    Each set (points ``[N, D]`` or image ``[C, H, W]``) keeps ``min(n_samples, N)`` points drawn without
    replacement; ``W2² = ot.emd2(1/n, 1/m, C)`` with ``C_ij = ‖x_i − y_j‖²``. Cost ``O(n·m)`` memory and
    a network-simplex solve: keep ``n_samples`` in the low thousands. As with any estimate from samples,
    two different subsamples of one large image are at a small positive distance.
    """
    import ot

    _positive_int("n_samples", n_samples)
    xa, xb = _as_points(a, "a"), _as_points(b, "b")
    _check_same_dim(xa, xb)
    g = _generator(seed)
    na = _subsample(xa, n_samples, g).cpu().numpy()
    nb = _subsample(xb, n_samples, g).cpu().numpy()
    cost = ot.dist(na, nb, metric="sqeuclidean")
    w2_sq = ot.emd2(ot.unif(na.shape[0]), ot.unif(nb.shape[0]), cost, numItermax=10_000_000)
    return math.sqrt(max(float(w2_sq), 0.0))


def gaussian_color_w2(a: Tensor, b: Tensor) -> float:
    """W2 distance between the Gaussians ``N(m_a, Σ_a)`` and ``N(m_b, Σ_b)`` fitted to two colour sets.

    ``m`` is the mean and ``Σ = (1/N) Σ_i (x_i − m)(x_i − m)ᵀ`` the maximum-likelihood covariance of
    the points (``[N, D]`` or image ``[C, H, W]``); the closed form is POT's
    ``ot.gaussian.bures_wasserstein_distance``.
    """
    import ot

    xa, xb = _as_points(a, "a"), _as_points(b, "b")
    _check_same_dim(xa, xb)
    ma, ca = _mean_cov(xa)
    mb, cb = _mean_cov(xb)
    return float(ot.gaussian.bures_wasserstein_distance(ma, mb, ca, cb))


def _mean_cov(x: Tensor) -> tuple:
    """Mean ``[D]`` and (1/N) covariance ``[D, D]`` of ``x [N, D]`` as float64 numpy arrays."""
    mean = x.mean(0)
    centred = x - mean
    cov = centred.T @ centred / x.shape[0]
    return mean.cpu().numpy(), (0.5 * (cov + cov.T)).cpu().numpy()


# ------------------------------------------------------------------------------------------------ SSIM

def luminance_ssim(a: Tensor, b: Tensor, window: int = 11) -> float:
    """Mean SSIM of the luminances of two RGB images ``[3, H, W]`` of the same size.

    Luminance is CIE L* (``kornia.color.rgb_to_lab``) divided by 100, so it lies in [0, 1]; the SSIM map is
    ``kornia.metrics.ssim`` with a Gaussian ``window × window`` window (σ = 1.5), dynamic range 1 and
    constants ``C1 = 0.01²``, ``C2 = 0.03²``, averaged over all pixels. 1 means identical.
    """
    import kornia.color as kc
    import kornia.metrics as km

    _check_image(a, "a")
    _check_image(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape for SSIM, got {tuple(a.shape)} and {tuple(b.shape)}")
    _positive_int("window", window)
    with torch.no_grad():
        la = kc.rgb_to_lab(a.detach().clamp(0, 1)[None])[:, :1] / 100.0
        lb = kc.rgb_to_lab(b.detach().to(a).clamp(0, 1)[None])[:, :1] / 100.0
        return float(km.ssim(la, lb, window, max_val=1.0).mean())


def _luminance_gradient(img: Tensor) -> Tensor:
    """``[H, W]`` Sobel gradient magnitude of the luminance L*/100 of ``img [3, H, W]`` (kornia's normalised
    Sobel: a step of height ``h`` gives ``h/2`` at the two pixels beside it), float64."""
    import kornia.color as kc
    import kornia.filters as kf

    lum = kc.rgb_to_lab(img.detach().double().clamp(0, 1)[None])[:, :1] / 100.0
    grad = kf.spatial_gradient(lum, mode="sobel", normalized=True)[:, 0]       # [1, 2, H, W]
    return grad.square().sum(1).sqrt()[0]


def false_edge_map(result: Tensor, source: Tensor, threshold: float = EDGE_THRESHOLD) -> Tensor:
    """``[H, W]`` booleans: the pixels where ``result [3, H, W]`` has a luminance edge that ``source`` (same
    size) lacks (the definition is :func:`false_edges`'s, whose value is this map's mean)."""
    _check_image(result, "result")
    _check_image(source, "source")
    if result.shape != source.shape:
        raise ValueError(f"result and source must have the same shape, got {tuple(result.shape)} and "
                         f"{tuple(source.shape)}")
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold!r}")
    with torch.no_grad():
        g_r, g_s = _luminance_gradient(result), _luminance_gradient(source.to(result))
        return (g_r > threshold) & (g_r > 3 * g_s)


def false_edges(result: Tensor, source: Tensor, threshold: float = EDGE_THRESHOLD) -> float:
    """Fraction of pixels where ``result [3, H, W]`` has a luminance edge that ``source`` (same size) lacks
    (:func:`false_edge_map` shows where).

    With ``g_r``, ``g_s`` the Sobel gradient magnitudes of L*/100 (:func:`_luminance_gradient`), a pixel is a
    false edge when ``g_r > threshold`` and ``g_r > 3 g_s``: an edge at least three times stronger than
    anything the source has there. Banding and posterisation (a smooth ramp cut into steps), a smooth region
    split between two colours and amplified noise or JPEG blocks all create such pixels; a transfer that
    changes the contrast of existing edges by less than 3× does not. 0 means none; identical images score 0.
    """
    return float(false_edge_map(result, source, threshold).double().mean())


# ---------------------------------------------------------------------------------------------- patches

def patch_sliced_w2(a: Tensor, b: Tensor, patch: int = 4, scales: int = 4, n_proj: int = 64,
                    n_samples: int = 4096, seed: int = 0) -> float:
    """Multi-scale patch sliced-W2 between two RGB images ``[3, H, W]`` and ``[3, H', W']`` (sizes may differ).

    Levels: ``S = min(scales, n_scales_for(H, W, m), n_scales_for(H', W', m))`` with
    ``m = max(16, patch)``, so the coarsest level of both images keeps a side of at least ``m``; each
    image's Gaussian pyramid is :func:`imgmw.patches.gaussian_pyramid`. At level ``s`` both images give
    ``n_s = min(n_samples, N_s, N'_s)`` random ``patch×patch`` patches (positions drawn without
    replacement, generator seeded with ``seed``; ``N_s`` is the number of positions), vectors of length
    ``3·patch²``, compared with :func:`sliced_w2` along ``random_directions(n_proj, 3·patch², seed)``.
    The result is the **mean over levels** of these SW2 distances.
    """
    _check_image(a, "a")
    _check_image(b, "b")
    _positive_int("patch", patch)
    _positive_int("scales", scales)
    _positive_int("n_proj", n_proj)
    _positive_int("n_samples", n_samples)
    for name, img in (("a", a), ("b", b)):
        if min(img.shape[-2:]) < patch:
            raise ValueError(f"{name} of size {img.shape[-2]}x{img.shape[-1]} is smaller than the patch size "
                             f"{patch}x{patch}")
    min_side = max(16, patch)
    n_levels = min(scales, n_scales_for(a.shape[-2], a.shape[-1], min_side),
                   n_scales_for(b.shape[-2], b.shape[-1], min_side))
    with torch.no_grad():
        pyr_a = gaussian_pyramid(a.detach().to(torch.float64)[None], n_levels)
        pyr_b = gaussian_pyramid(b.detach().to(device=a.device, dtype=torch.float64)[None], n_levels)
        theta = random_directions(n_proj, 3 * patch * patch, seed, device=a.device)
        g = _generator(seed)
        distances = [_level_sliced_w2(la, lb, patch, n_samples, theta, g) for la, lb in zip(pyr_a, pyr_b)]
    return float(sum(distances) / len(distances))


def _level_sliced_w2(a: Tensor, b: Tensor, patch: int, n_samples: int, theta: Tensor,
                     generator: torch.Generator) -> float:
    """SW2 between equal-size random patch subsets of two pyramid levels ``[1, 3, h, w]``."""
    n_a = math.prod(patch_grid(a.shape[-2], a.shape[-1], patch))
    n_b = math.prod(patch_grid(b.shape[-2], b.shape[-1], patch))
    n = min(n_samples, n_a, n_b)
    pa = random_patches(a, patch, n, generator)[0]
    pb = random_patches(b, patch, n, generator)[0]
    return float(sliced_w2(pa, pb, theta))


# -------------------------------------------------------------------------------------------- structure

@overload
def nearest_patch_rms(result: Tensor, exemplar: Tensor, patch: int = ..., n_samples: int = ..., seed: int = ...,
                      chunk: int = ..., *, with_contrast: Literal[False] = ...) -> Tensor: ...
@overload
def nearest_patch_rms(result: Tensor, exemplar: Tensor, patch: int = ..., n_samples: int = ..., seed: int = ...,
                      chunk: int = ..., *, with_contrast: Literal[True]) -> tuple[Tensor, Tensor]: ...
def nearest_patch_rms(result: Tensor, exemplar: Tensor, patch: int = STRUCTURE_PATCH, n_samples: int = 1024,
                      seed: int = 0, chunk: int = 4096, *,
                      with_contrast: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """RMS distance of random ``patch × patch`` patches of ``result [3, H, W]`` to their nearest patch of
    ``exemplar [3, H', W']``: ``[n]`` with ``n = min(n_samples, positions of result)``.

    ``d(q) = min_e sqrt(‖q − e‖² / (3 p²))`` over **every** exemplar position (stride 1), so a verbatim
    copy of an exemplar region scores exactly 0. Result positions are drawn without replacement with a
    generator seeded by ``seed``. Computed in float64 by ``‖q‖² + ‖e‖² − 2 q·e`` over chunks of ``chunk``
    exemplar patches (``O(n · chunk)`` memory); the nearest patch's distance is then recomputed directly,
    so a copy scores exactly 0. ``with_contrast``: also return each result patch's RMS deviation from its
    own mean ``[n]`` (what :func:`near_copy_fraction` compares the distance with).
    """
    a, b = _check_image(result, "result"), _check_image(exemplar, "exemplar")
    _positive_int("patch", patch)
    _positive_int("n_samples", n_samples)
    for name, img in (("result", a), ("exemplar", b)):
        if min(img.shape[-2:]) < patch:
            raise ValueError(f"{name} ({img.shape[-2]}x{img.shape[-1]}) is smaller than the {patch}x{patch} patches")
    with torch.no_grad():
        n = min(n_samples, math.prod(patch_grid(a.shape[-2], a.shape[-1], patch)))
        q = random_patches(a[None].double(), patch, n, _generator(seed))[0]           # [n, 3p²]
        q_sq = q.square().sum(-1, keepdim=True)
        best = torch.full((n,), math.inf, dtype=torch.float64, device=q.device)
        where = torch.zeros(n, dtype=torch.long, device=q.device)
        rows, cols = patch_grid(b.shape[-2], b.shape[-1], patch)
        b64 = b[None].double()
        for start in range(0, rows * cols, chunk):
            pos = torch.arange(start, min(start + chunk, rows * cols), device=b.device)
            e = gather_patches(b64, patch, pos)[0]                                      # [c, 3p²]
            value, index = (q_sq + e.square().sum(-1)[None] - 2 * q @ e.T).min(-1)
            closer = value < best
            best, where = torch.where(closer, value, best), torch.where(closer, pos[index], where)
        # the distance to the nearest patch recomputed directly: exact (0 for a copy), no cancellation
        nearest = gather_patches(b64, patch, where)[0]
        dist = (q - nearest).square().mean(-1).sqrt()
        if not with_contrast:
            return dist
        return dist, (q - q.mean(-1, keepdim=True)).square().mean(-1).sqrt()


def structure_distance(result: Tensor, exemplar: Tensor, patch: int = STRUCTURE_PATCH, n_samples: int = 1024,
                       seed: int = 0) -> float:
    """Mean of :func:`nearest_patch_rms`: how far the result's large patches are from *any* exemplar patch.

    Broken structures (a vein cut into blotches, a stripe smeared) have no close exemplar patch, so they
    raise it, while local colour and 4×4 statistics (what :func:`patch_sliced_w2` sees) can stay right.
    Lower is better; a verbatim copy scores 0, so read it with :func:`near_copy_fraction`. Another crop of
    the same photograph is the reference level a synthesis should reach.
    """
    return float(nearest_patch_rms(result, exemplar, patch, n_samples, seed).mean())


def near_copy_fraction(result: Tensor, exemplar: Tensor, patch: int = STRUCTURE_PATCH, n_samples: int = 1024,
                       seed: int = 0, ratio: float = COPY_RATIO) -> float:
    """Fraction of the result's ``patch × patch`` patches that nearly copy an exemplar patch: their
    :func:`nearest_patch_rms` is at most ``ratio`` (default 0.1) times their own contrast (RMS deviation
    from the patch mean). Relative to contrast, so that flat patches (a uniform stripe, a clear sky), which
    are close to many exemplar patches without copying anything, do not count; a verbatim copy always does."""
    if not ratio > 0:
        raise ValueError(f"ratio must be > 0, got {ratio!r}")
    dist, contrast = nearest_patch_rms(result, exemplar, patch, n_samples, seed, with_contrast=True)
    return float((dist <= ratio * contrast).double().mean())


# ------------------------------------------------------------------------------------------------ seams

def seam_energy(img: Tensor) -> dict[str, float]:
    """Tileability of ``img [C, H, W]`` (H, W >= 2): wrap-around seam vs interior neighbour differences.

    * ``seam = ½ [ mean_{c,i} (x[c,i,0] − x[c,i,W−1])² + mean_{c,j} (x[c,0,j] − x[c,H−1,j])² ]``
    * ``interior = ½ [ mean_{c,i,j<W−1} (x[c,i,j+1] − x[c,i,j])²``
      ``+ mean_{c,i<H−1,j} (x[c,i+1,j] − x[c,i,j])² ]``
    * ``ratio = (seam + ε) / (interior + ε)`` with ``ε = 1e-12`` (a constant image gives 1).

    A periodic (tileable) image has ``ratio ≈ 1``; a crop of a photograph, whose opposite borders are
    unrelated, has ``ratio ≫ 1``.
    """
    if not isinstance(img, Tensor) or img.dim() != 3 or min(img.shape[-2:]) < 2:
        shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
        raise ValueError(f"img must be an image tensor [C, H, W] with H, W >= 2, got {shape}")
    x = img.detach().to(torch.float64)
    seam = 0.5 * ((x[:, :, 0] - x[:, :, -1]).square().mean() + (x[:, 0, :] - x[:, -1, :]).square().mean())
    interior = 0.5 * (x.diff(dim=2).square().mean() + x.diff(dim=1).square().mean())
    eps = 1e-12
    return {"seam": float(seam), "interior": float(interior), "ratio": float((seam + eps) / (interior + eps))}
