"""Colour transfer with Gaussian-mixture optimal transport.

Methods (:func:`transfer_colours`):

- ``"flow"`` (the paper's method): the source's colours are the variables ``X``; the target's colour GMM
  ``ν`` (``K`` components) is fitted once; each iteration performs one warm-started EM step on the current
  colours (:class:`imgmw.WarmStartEM` with its fit-keeping policy) and one Wasserstein gradient step on
  ``MW2²(EM(X), ν)`` (:func:`imgmw.flow.run_flow`). Mixture weights are learned on both sides (the paper
  fixes them uniform; see :mod:`imgmw.losses` for why that is not the default here).
- ``"unbalanced"``: the same flow on the unbalanced ``UMW2²`` with ``λ = (λ_source, λ_target)``
  (default ``(10, 0.1)``): target colours the source has no counterpart for are not forced onto it.
- ``"map"``: no optimisation; the Delon–Desolneux GMM-OT map (``"bary"`` or ``"rand"``) from the
  source's GMM to the target's, applied to every pixel (:func:`imgmw.gmm_ot_map`).

Speed for large images: the flow acts on colours, not positions, so it runs on a *palette*: the sRGB cube
is cut into ``levels³`` bins, each occupied bin becomes one point (the mean colour of its pixels) weighted
by its pixel count (EM with ``sample_weight`` is exactly EM on the repeated colours). The displacement
of every palette colour is then spread to all pixels through a 3-D lookup table: the displacements are
splatted onto the ``(levels+1)³`` bin corners with trilinear weights × counts, normalised, and read back
per pixel by trilinear interpolation. Pixels of one bin thus move smoothly rather than all by the same
vector. ``tests/test_colour.py`` measures the error of this approximation against the flow on all
pixels.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .flow import FlowResult, refit_mw2, run_flow
from .gmm import GMM
from .image import from_colorspace, image_to_points, points_to_image, to_colorspace
from .losses import data_reg_covar, fit_target, relative_reg_covar
from .ot import gmm_ot_map, mw2
from .warm import FitPolicy, WarmStartEM

__all__ = ["METHODS", "SPACE_SCALE", "Palette", "ColourTransferResult", "build_palette", "apply_palette_lut",
           "fit_colour_gmm", "colour_reg_covar", "colour_flow", "transfer_colours", "to_scaled_space", "from_scaled_space"]

METHODS = ("flow", "map", "unbalanced")
SPACE_SCALE = {"rgb": 1.0, "linear": 1.0, "lab": 100.0}  # colours are divided by this, so all spaces are O(1)
_LEVEL_CHOICES = (64, 48, 32, 24, 16, 12, 8, 6, 4)


@dataclass
class Palette:
    """Weighted distinct colours of an image.

    Attributes:
        colours: ``[M, 3]`` mean sRGB colour of each occupied bin.
        counts: ``[M]`` number of pixels in each bin.
        inverse: ``[H·W]`` bin index (into ``colours``) of each pixel.
        levels: bins per channel.
    """

    colours: Tensor
    counts: Tensor
    inverse: Tensor
    levels: int


def _bin_index(rgb: Tensor, levels: int) -> Tensor:
    q = (rgb.clamp(0, 1) * levels).long().clamp_max(levels - 1)
    return (q[..., 0] * levels + q[..., 1]) * levels + q[..., 2]


def build_palette(img: Tensor, max_colors: int = 8192) -> Palette:
    """Quantise ``img [3, H, W]`` (sRGB in [0, 1]) into at most ``max_colors`` weighted colours.

    Uses the finest grid of ``levels³`` bins (``levels`` from 64 down to 4) whose number of occupied bins
    is at most ``max_colors``.
    """
    if max_colors < 1:
        raise ValueError(f"max_colors must be >= 1, got {max_colors}")
    pix = image_to_points(img)  # [H·W, 3]
    for levels in _LEVEL_CHOICES:
        uniq, inverse, counts = torch.unique(_bin_index(pix, levels), return_inverse=True, return_counts=True)
        if uniq.numel() <= max_colors or levels == _LEVEL_CHOICES[-1]:
            break
    sums = torch.zeros(uniq.numel(), 3, dtype=pix.dtype, device=pix.device).index_add_(0, inverse, pix)
    return Palette(sums / counts.unsqueeze(-1).to(pix.dtype), counts.to(pix.dtype), inverse, levels)


def _corner_weights(rgb: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    """Flat indices ``[P, 8]`` of the 8 grid corners around each colour and their trilinear weights ``[P, 8]``."""
    g = rgb.clamp(0, 1) * levels
    base = g.floor().clamp_max(levels - 1)
    frac = g - base
    base = base.long()
    n = levels + 1
    idx, wts = [], []
    for corner in range(8):
        off = torch.tensor([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1], device=rgb.device)
        c = base + off
        idx.append((c[:, 0] * n + c[:, 1]) * n + c[:, 2])
        wts.append(torch.where(off.bool(), frac, 1 - frac).prod(-1))
    return torch.stack(idx, -1), torch.stack(wts, -1)


def apply_palette_lut(img: Tensor, palette: Palette, new_colours: Tensor) -> Tensor:
    """Move every pixel of ``img [3, H, W]`` by the palette's displacements, through a trilinear 3-D LUT.

    ``new_colours [M, 3]`` are the moved palette colours (sRGB). Returns ``[3, H, W]`` clamped to [0, 1].
    """
    levels = palette.levels
    disp = new_colours - palette.colours  # [M, 3]
    idx, wts = _corner_weights(palette.colours, levels)
    wts = wts * palette.counts.unsqueeze(-1)
    n_nodes = (levels + 1) ** 3
    num = torch.zeros(n_nodes, 3, dtype=disp.dtype, device=disp.device)
    den = torch.zeros(n_nodes, dtype=disp.dtype, device=disp.device)
    num.index_add_(0, idx.flatten(), (wts.unsqueeze(-1) * disp.unsqueeze(1)).flatten(0, 1))
    den.index_add_(0, idx.flatten(), wts.flatten())
    lut = num / den.clamp_min(torch.finfo(den.dtype).tiny).unsqueeze(-1)
    pix = image_to_points(img)
    pidx, pw = _corner_weights(pix, levels)
    # a corner that received no splat has lut = 0 there; renormalise over the corners that did
    filled = (den[pidx] > 0).to(pw.dtype)
    pw = pw * filled
    moved = pix + (pw.unsqueeze(-1) * lut[pidx]).sum(1) / pw.sum(-1, keepdim=True).clamp_min(1e-12)
    return points_to_image(moved, img.shape[-2], img.shape[-1]).clamp(0, 1)


def to_scaled_space(rgb_points: Tensor, space: str) -> Tensor:
    """``[M, 3]`` sRGB → points ``[M, 3]`` in ``space`` divided by ``SPACE_SCALE[space]`` (all O(1))."""
    return to_colorspace(rgb_points.T.unsqueeze(-1), space).squeeze(-1).T / SPACE_SCALE[space]



def from_scaled_space(points: Tensor, space: str) -> Tensor:
    """Inverse of :func:`to_scaled_space`: scaled colour-space points ``[M, 3]`` → sRGB (clipped to [0, 1])."""
    return from_colorspace((points * SPACE_SCALE[space]).T.unsqueeze(-1), space).squeeze(-1).T


def fit_colour_gmm(palette: Palette, space: str, k: int, *, generator: torch.Generator | None = None,
                   fixed_weights: bool = False) -> GMM:
    """GMM with ``k`` components of an image's colours (its palette, weighted by pixel counts), in ``space``
    (:func:`imgmw.losses.fit_target`; its ``reg_covar`` is :func:`colour_reg_covar` of the palette)."""
    pts = to_scaled_space(palette.colours, space)
    if pts.shape[0] < k:
        raise ValueError(f"the image has only {pts.shape[0]} distinct colours, fewer than k={k}; lower --k")
    return fit_target(pts, k, sample_weight=palette.counts, fixed_weights=fixed_weights, generator=generator)


def colour_reg_covar(palette: Palette, space: str) -> float:
    """``reg_covar`` of a colour target fitted by :func:`fit_colour_gmm` (and of the fits compared with it)."""
    return data_reg_covar(to_scaled_space(palette.colours, space), palette.counts)


def colour_flow(points: Tensor, weights: Tensor, target: GMM, *, iters: int = 100, lr: float = 0.2,
                unbalanced: tuple[float, float] | None = None, reg_covar: float | None = None,
                optimizer: str = "gd", max_step: float = 0.01, init: GMM | None = None,
                fixed_weights: bool = False, policy: FitPolicy | None = FitPolicy(),
                generator: torch.Generator | None = None,
                callback: Callable[[int, float, Tensor], None] | None = None) -> tuple[Tensor, FlowResult, WarmStartEM]:
    """Minimise ``E(X) = MW2²(EM(X), target)`` over weighted points ``X = points [M, D]`` (warm-started EM).

    Each iteration does one warm-started EM step on the current ``X`` (point weights ``weights [M]``,
    :class:`imgmw.WarmStartEM` with ``policy``; learned mixture weights unless ``fixed_weights``) and one
    step of :func:`imgmw.flow.run_flow`. ``optimizer="gd"`` (default) is the explicit Euler step of the
    Wasserstein gradient flow of ``E`` on the measure ``Σ ω̂_i δ_{x_i}`` (``ω̂ = ω / Σω``):
    ``x_i ← x_i − lr · ∇_{x_i}E / ω̂_i``, which moves every *pixel* at the speed the gradient asks for
    whatever the size of its palette bin; each point's step is capped at length ``max_step``. ``"adam"``
    uses Adam, which normalises every coordinate's step and so moves rare colours as fast as frequent ones
    (noisier). ``reg_covar=None`` uses ``1e-4 ×`` the largest covariance eigenvalue of ``target``.
    ``init``: the GMM the warm-started EM starts from (default: k-means++ on ``X``). ``callback(i, loss, X)``
    is called after every step. Returns ``(X, flow result, the warm-started EM)``.
    """
    if optimizer not in ("gd", "adam"):
        raise ValueError(f"optimizer must be 'gd' or 'adam', got {optimizer!r}")
    reg = relative_reg_covar(target) if reg_covar is None else reg_covar
    em = WarmStartEM(target.n_components, init="kmeans++" if init is None else init, fixed_weights=fixed_weights,
                     reg_covar=reg, n_init_iter=30, policy=policy, generator=generator)

    def objective(x: Tensor, _: int) -> Tensor:
        return mw2(em(x, sample_weight=weights), target, unbalanced=unbalanced)

    mass = weights / weights.sum() if optimizer == "gd" else None
    result = run_flow(points, objective, iters=iters, lr=lr, step=optimizer, point_mass=mass,
                      max_step=max_step if optimizer == "gd" else None, callback=callback)
    return result.x, result, em


@dataclass
class ColourTransferResult:
    """Output of :func:`transfer_colours`.

    Attributes:
        image: the recoloured ``[3, H, W]``.
        losses: the flow's loss before every step (the map: its one ``MW2²`` between the two fits).
        refit_mw2: ``MW2²`` between a fresh fit of the result's colours and the target mixture
            (:func:`imgmw.flow.refit_mw2`); compare with ``losses[-1]``.
        fit: what the warm start's fit-keeping policy did (:meth:`imgmw.warm.FitDiagnostics.as_dict`).
        n_colours, levels: palette size and bins per channel.
        seconds: wall time.
    """

    image: Tensor
    losses: list[float] = field(default_factory=list)
    refit_mw2: float = float("nan")
    fit: dict = field(default_factory=dict)
    n_colours: int = 0
    levels: int = 0
    seconds: float = 0.0


def transfer_colours(source: Tensor, target: Tensor, *, method: str = "flow", colorspace: str = "rgb",
                     k: int = 10, iters: int = 100, lr: float = 0.2, optimizer: str = "gd", max_colors: int = 8192,
                     unbalanced: tuple[float, float] = (10.0, 0.1), map_method: str = "bary",
                     fixed_weights: bool = False, policy: FitPolicy | None = FitPolicy(), seed: int = 0,
                     diagnose: bool = True, callback: Callable[[int, float, Callable[[], Tensor]], None] | None = None
                     ) -> ColourTransferResult:
    """Give ``source [3, H, W]`` the colours of ``target [3, H', W']`` (sRGB in [0, 1]); see the module doc.

    Args:
        method: ``"flow"``, ``"unbalanced"`` or ``"map"``.
        colorspace: ``"rgb"``, ``"lab"`` or ``"linear"``: where the GMMs live and the flow moves colours.
        k: mixture components on both sides.
        iters, lr, optimizer: steps, step size and step rule of the flows (see :func:`colour_flow`;
            colours are scaled to O(1) in every space).
        max_colors: bound on the palette size of the flows (see the module doc).
        unbalanced: ``(λ_source, λ_target)`` of the unbalanced method.
        map_method: ``"bary"`` or ``"rand"`` for ``method="map"``.
        fixed_weights, policy: the mixtures' weighting and the warm start's fit-keeping policy.
        seed: seeds k-means++ and the random map.
        diagnose: compute :attr:`ColourTransferResult.refit_mw2` (three fresh fits of the result's palette).
        callback: ``callback(i, loss, render)`` after every flow iteration; ``render()`` returns the
            current recoloured image ``[3, H, W]`` (computed only when called).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if colorspace not in SPACE_SCALE:
        raise ValueError(f"colorspace must be one of {', '.join(SPACE_SCALE)}, got {colorspace!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    t0 = time.perf_counter()
    gen = torch.Generator(device=source.device).manual_seed(seed)
    tgt_pal = build_palette(target, max_colors)
    tgt_gmm = fit_colour_gmm(tgt_pal, colorspace, k, generator=gen, fixed_weights=fixed_weights)
    reg = colour_reg_covar(tgt_pal, colorspace)
    palette = build_palette(source, max_colors)
    if palette.colours.shape[0] < k:
        raise ValueError(f"the source has only {palette.colours.shape[0]} distinct colours, fewer than k={k}; "
                         "lower k")
    if method == "map":
        src_gmm = fit_colour_gmm(palette, colorspace, k, generator=gen, fixed_weights=fixed_weights)
        pts = to_scaled_space(image_to_points(source), colorspace)
        moved = gmm_ot_map(pts, src_gmm, tgt_gmm, method=map_method, generator=gen)
        image = points_to_image(from_scaled_space(moved, colorspace), source.shape[-2], source.shape[-1]).clamp(0, 1)
        losses, fit = [float(mw2(src_gmm, tgt_gmm))], {}
    else:
        def render(x: Tensor) -> Tensor:
            return apply_palette_lut(source, palette, from_scaled_space(x, colorspace))

        hook = None if callback is None else (lambda i, loss, x: callback(i, loss, lambda: render(x)))
        moved_palette, flow, em = colour_flow(
            to_scaled_space(palette.colours, colorspace), palette.counts, tgt_gmm, iters=iters, lr=lr,
            optimizer=optimizer, unbalanced=unbalanced if method == "unbalanced" else None, reg_covar=reg,
            fixed_weights=fixed_weights, policy=policy, generator=gen, callback=hook)
        image = render(moved_palette)
        losses, fit = flow.losses, em.diagnostics.as_dict()
    refit = float("nan")
    if diagnose:
        result_pal = build_palette(image, max_colors)
        refit = float(refit_mw2(to_scaled_space(result_pal.colours, colorspace), tgt_gmm,
                                sample_weight=result_pal.counts, fixed_weights=fixed_weights, reg_covar=reg,
                                unbalanced=unbalanced if method == "unbalanced" else None, generator=gen))
    return ColourTransferResult(image, losses, refit, fit, palette.colours.shape[0], palette.levels,
                                time.perf_counter() - t0)
