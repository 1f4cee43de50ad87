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
per pixel by trilinear interpolation (one ``grid_sample`` over the lattice). Pixels of one bin thus move
smoothly rather than all by the same vector. ``tests/test_colour.py`` measures the error of this
approximation against the flow on all pixels. ``MAX_COLORS`` = 2048 (an 8192 bound cost 2.5× more per step
for 0.000–0.003 of SW2 after the pipeline) and a warm start that refits every 50 steps (``COLOUR_POLICY``;
every 25: no better on any pair) keep a 1-megapixel transfer near 1.5 s on 2 cores.

Keeping the source's structure (defaults chosen on the three bundled pairs, ``benchmarks/bench_color.py``).
A particle flow moves every colour on its own, so neighbouring colours of one smooth region can end in
different target components (a smooth sky cut by a hard edge) and the luminance order of the source is
lost; measured, the flow alone kept a luminance SSIM of 0.13–0.62 (IDT: 0.12–0.72) with 3–6 % of the pixels
false edges (:func:`imgmw.metrics.false_edges`). The pipeline is therefore:

1. **luminance match** (``luminance="match"``): L* is set to its monotone 1-D optimal-transport match to the
   target's L* distribution (:func:`monotone_match`: order-preserving, so no luminance edge can appear or
   flip) and the MW2 flow moves only a* and b*. Raw SSIM rose to 0.13–0.74.
2. **regrain** (:mod:`imgmw.regrain`): the image whose gradients follow the source's and whose colours follow
   the flow's; false edges fell to 0.01–0.5 %, SSIM rose to 0.21–0.83.
3. **polish** (``polish_n_iter`` = 30): regrain pulls the colours back towards the source (colour SW2 to the
   target rose from 0.009–0.030 to 0.032–0.037), so a short flow from the regrained image's own palette,
   L* frozen, its velocity smoothed over the palette's colours (:class:`VelocitySmoother`, σ = 0.05),
   brings them back (0.024–0.037) without touching the luminance structure. Unsmoothed, the polish cut a
   smooth grey ramp sent to a red/blue target (largest step between neighbouring columns 0.14 of the
   colour range, against 0.05 smoothed and 0.45 for the flow alone). The polish descends ``MW2²`` between
   two 20-component fits, which on astronaut → chelsea moved the colours *away* from the target (SW2 0.0368
   after regrain, 0.0378 after 30 steps, 0.0391 after 60; 2048 colours, refits every 25 steps) while helping the
   other pairs; it therefore scores its colours every ``POLISH_CHECK`` steps by their sliced W2 in sRGB to the target's
   palette and keeps the best (``ColourTransferResult.polish_kept``).

K = 20 measured best after the pipeline, by up to 0.001 of SW2 on every pair (K = 10 / 20 / 32: 0.0246 /
0.0239 / 0.0242, 0.0363 / 0.0360 / 0.0366, 0.0343 / 0.0339 / 0.0343). Tried and dropped: smoothing the main
flow's velocity (σ = 0.03–0.1) lowered its SSIM (0.47–0.59 against 0.60–0.65); regrain with a lower
smoothness traded false edges for colour; re-matching L* in the polish brought SW2 to 0.008–0.012 but the
false edges back to 0.8–1.7 %; matching L* per pixel after the flow (a histogram match; the palette's
match is on bin means) lowered SSIM nowhere but raised SW2 after regrain on astronaut → chelsea (0.0368 →
0.0402); a Gaussian (linear) OT map of a*b* as the flow's start saved no steps.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from collections.abc import Callable

import torch
from torch import Tensor

from .deprecation import generator_from_seed, renamed_parameters
from .flow import FlowResult, refit_mw2, run_flow
from .gmm import GMM
from .image import from_colorspace, image_to_points, points_to_image, to_colorspace
from .metrics import random_directions, weighted_sliced_w2
from .losses import data_reg_covar, fit_target, relative_reg_covar
from .ot import gmm_ot_map, mw2
from . import regrain as grain
from .regrain import regrain
from .validation import check_choice
from .warm import FitPolicy, WarmStartEM

__all__ = ["METHODS", "SPACE_SCALE", "MAX_COLORS", "COLOUR_POLICY", "Palette", "ColourTransferResult", "build_palette",
           "apply_palette_lut", "fit_colour_gmm", "colour_reg_covar", "monotone_match", "VelocitySmoother",
           "colour_flow", "regrain", "transfer_colours", "to_scaled_space", "from_scaled_space"]

METHODS = ("flow", "map", "unbalanced")
LUMINANCE = ("match", "free")
POLISH_ITERS = 30     # flow steps after regrain (see the module docstring)
POLISH_SMOOTH = 0.05  # σ (sRGB units) of the polish's velocity smoothing (VelocitySmoother)
POLISH_CHECK = 5      # the polish scores its colours every this many steps (_BestIterate)
MAX_COLORS = 2048     # palette bound of the flows (see the module docstring)
COLOUR_POLICY = FitPolicy(check_every=50)  # the warm start's fit keeping (see the module docstring)
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
        bins = _bin_index(pix, levels)
        counts = torch.bincount(bins, minlength=levels ** 3)  # O(H·W), no sort
        occupied = counts > 0
        if int(occupied.sum()) <= max_colors or levels == _LEVEL_CHOICES[-1]:
            break
    slot = occupied.long().cumsum(0) - 1   # bin → its index among the occupied bins
    inverse, counts = slot[bins], counts[occupied].to(pix.dtype)
    sums = torch.zeros(counts.numel(), 3, dtype=pix.dtype, device=pix.device).index_add_(0, inverse, pix)
    return Palette(sums / counts.unsqueeze(-1), counts, inverse, levels)


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
    n = levels + 1
    num = torch.zeros(n ** 3, 3, dtype=disp.dtype, device=disp.device)
    den = torch.zeros(n ** 3, dtype=disp.dtype, device=disp.device)
    num.index_add_(0, idx.flatten(), (wts.unsqueeze(-1) * disp.unsqueeze(1)).flatten(0, 1))
    den.index_add_(0, idx.flatten(), wts.flatten())
    filled = (den > 0).to(disp.dtype)
    # channels: the LUT (0 at corners no colour splatted onto) and the indicator of splatted corners; the
    # pixel's displacement renormalises its trilinear weights over the splatted corners
    lut = torch.cat([num / den.clamp_min(torch.finfo(den.dtype).tiny).unsqueeze(-1), filled.unsqueeze(-1)], -1)
    volume = lut.T.reshape(1, 4, n, n, n)                          # [1, 4, R, G, B]
    pix = image_to_points(img)
    grid = (pix.clamp(0, 1).flip(-1) * 2 - 1).view(1, 1, 1, -1, 3)  # grid_sample's (x, y, z) index (B, G, R)
    read = torch.nn.functional.grid_sample(volume, grid, mode="bilinear", padding_mode="border",
                                           align_corners=True).view(4, -1)
    moved = pix + (read[:3] / read[3].clamp_min(1e-12)).T
    return points_to_image(moved, img.shape[-2], img.shape[-1]).clamp(0, 1)


class VelocitySmoother:
    """Normalised Gaussian smoothing, over the colours of a palette, of a field given at those colours.

    ``v̄_i = Σ_j G_σ(c_i − c_j) ω_j v_j / Σ_j G_σ(c_i − c_j) ω_j`` for palette colours ``c [M, 3]`` (sRGB) with
    masses ``ω [M]``, computed on a ``(grid+1)³`` lattice over the sRGB cube (trilinear splat, separable
    Gaussian blur of standard deviation ``σ`` with replicated borders, trilinear read-back) in
    ``O(M + grid³)`` instead of ``O(M²)``. As a flow's preconditioner it makes neighbouring colours move
    together, so that the map from old to new colours stays smooth.
    """

    def __init__(self, colours: Tensor, mass: Tensor, sigma: float, grid: int = 32) -> None:
        if not 0 < sigma < math.inf:
            raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
        self.grid, self.mass = grid, mass
        self.idx, self.wts = _corner_weights(colours, grid)                        # [M, 8]
        radius = max(1, math.ceil(3 * sigma * grid))
        t = torch.arange(-radius, radius + 1, dtype=colours.dtype, device=colours.device) / (sigma * grid)
        kernel = torch.exp(-0.5 * t.square())
        self.kernel = kernel / kernel.sum()
        self.den = self._blur(self._splat(torch.ones_like(mass).unsqueeze(-1)))

    def _splat(self, field: Tensor) -> Tensor:
        n = self.grid + 1
        out = torch.zeros(n ** 3, field.shape[-1], dtype=field.dtype, device=field.device)
        out.index_add_(0, self.idx.flatten(), ((self.wts * self.mass.unsqueeze(-1)).unsqueeze(-1)
                                               * field.unsqueeze(1)).flatten(0, 1))
        return out.T.reshape(1, field.shape[-1], n, n, n)

    def _blur(self, lattice: Tensor) -> Tensor:
        c, r = lattice.shape[1], self.kernel.numel() // 2
        for axis in range(3):
            shape = [1, 1, 1]
            shape[axis] = self.kernel.numel()
            pad = [0] * 6
            pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
            weight = self.kernel.view(1, 1, *shape).expand(c, 1, *shape)
            lattice = torch.nn.functional.conv3d(torch.nn.functional.pad(lattice, pad, mode="replicate"), weight,
                                                 groups=c)
        return lattice

    def __call__(self, field: Tensor) -> Tensor:
        """``[M, C]`` smoothed field for a field ``[M, C]`` at the palette colours."""
        c = field.shape[-1]
        smooth = (self._blur(self._splat(field)).reshape(c, -1) / self.den.reshape(1, -1).clamp_min(1e-30)).T
        return (smooth[self.idx] * self.wts.unsqueeze(-1)).sum(1)


def to_scaled_space(rgb_points: Tensor, space: str) -> Tensor:
    """``[M, 3]`` sRGB → points ``[M, 3]`` in ``space`` divided by ``SPACE_SCALE[space]`` (all O(1))."""
    return to_colorspace(rgb_points.T.unsqueeze(-1), space).squeeze(-1).T / SPACE_SCALE[space]



def from_scaled_space(points: Tensor, space: str) -> Tensor:
    """Inverse of :func:`to_scaled_space`: scaled colour-space points ``[M, 3]`` → sRGB (clipped to [0, 1])."""
    return from_colorspace((points * SPACE_SCALE[space]).T.unsqueeze(-1), space).squeeze(-1).T


@renamed_parameters(k="n_components")
def fit_colour_gmm(palette: Palette, space: str, n_components: int, *, generator: torch.Generator | None = None,
                   fixed_weights: bool = False) -> GMM:
    """GMM with ``n_components`` components of an image's colours (its palette, weighted by pixel counts), in
    ``space`` (:func:`imgmw.losses.fit_target`; its ``reg_covar`` is :func:`colour_reg_covar` of the palette)."""
    pts = to_scaled_space(palette.colours, space)
    if pts.shape[0] < n_components:
        raise ValueError(f"the image has only {pts.shape[0]} distinct colours, fewer than n_components="
                         f"{n_components}")
    return fit_target(pts, n_components, sample_weight=palette.counts, fixed_weights=fixed_weights,
                      generator=generator)


def colour_reg_covar(palette: Palette, space: str) -> float:
    """``reg_covar`` of a colour target fitted by :func:`fit_colour_gmm` (and of the fits compared with it)."""
    return data_reg_covar(to_scaled_space(palette.colours, space), palette.counts)


def monotone_match(values: Tensor, weights: Tensor, target_values: Tensor, target_weights: Tensor) -> Tensor:
    """The monotone (1-D optimal transport) map of weighted ``values [M]`` onto the weighted distribution of
    ``target_values [M']``: each distinct value goes to the target quantile of its mid-rank ``F(v) − ω(v)/2``
    (``ω(v)``: the total weight of that value; linear interpolation between the target's mid-ranks). Order is
    preserved and equal values get equal outputs."""
    uniq, inverse = torch.unique(values, return_inverse=True)          # sorted distinct values
    w = torch.zeros(uniq.numel(), dtype=weights.dtype, device=weights.device).index_add_(0, inverse, weights)
    w = w / w.sum()
    rank = w.cumsum(0) - 0.5 * w
    t_order = target_values.argsort()
    tw = target_weights[t_order] / target_weights.sum()
    t_rank, t_sorted = tw.cumsum(0) - 0.5 * tw, target_values[t_order]
    hi = torch.searchsorted(t_rank.contiguous(), rank.contiguous()).clamp(1, max(1, t_rank.numel() - 1))
    lo = hi - 1
    span = (t_rank[hi] - t_rank[lo]).clamp_min(torch.finfo(t_rank.dtype).tiny)
    frac = ((rank - t_rank[lo]) / span).clamp(0, 1)
    return (t_sorted[lo] + frac * (t_sorted[hi] - t_sorted[lo]))[inverse]


class _BestIterate:
    """The polish's keeper: scores palette colours by their sliced W2 in sRGB to the target's palette
    (:func:`imgmw.metrics.weighted_sliced_w2`, both weighted by pixel counts, 64 seeded directions) and keeps
    the best. The polish descends ``MW2²`` between two K-component fits, which can move the colours away
    from the target while the fits get closer (measured on astronaut → chelsea: 0.0368 → 0.0391 of colour
    SW2 over 60 steps); the score looks at the colours themselves."""

    def __init__(self, pal: Palette, target: Palette, space: str) -> None:
        self.pal, self.target, self.space = pal, target, space
        self.directions = random_directions(64, 3, 0, device=pal.colours.device, dtype=pal.colours.dtype)
        self.score, self.step = math.inf, 0
        self.x: Tensor | None = None

    def offer(self, step: int, x: Tensor) -> None:
        score = float(weighted_sliced_w2(from_scaled_space(x.detach(), self.space), self.target.colours,
                                         self.directions, x_weight=self.pal.counts, y_weight=self.target.counts))
        if score < self.score:
            self.score, self.step, self.x = score, step, x.detach().clone()


@renamed_parameters(weights="sample_weight", iters="n_iter")
def colour_flow(points: Tensor, sample_weight: Tensor, target: GMM, *, n_iter: int = 100, lr: float = 0.2,
                unbalanced: tuple[float, float] | None = None, reg_covar: float | None = None,
                optimizer: str = "gd", max_step: float = 0.01, init: GMM | None = None,
                fixed_weights: bool = False, policy: FitPolicy | None = FitPolicy(), frozen: tuple[int, ...] = (),
                smooth: Callable[[Tensor], Tensor] | None = None, generator: torch.Generator | None = None,
                callback: Callable[[int, Tensor, Tensor], None] | None = None
                ) -> tuple[Tensor, FlowResult, WarmStartEM]:
    """Minimise ``E(X) = MW2²(EM(X), target)`` over weighted points ``X = points [M, D]`` (warm-started EM).

    Each iteration does one warm-started EM step on the current ``X`` (point weights ``sample_weight [M]``,
    :class:`imgmw.WarmStartEM` with ``policy``; learned mixture weights unless ``fixed_weights``) and one
    step of :func:`imgmw.flow.run_flow`. ``optimizer="gd"`` (default) is the explicit Euler step of the
    Wasserstein gradient flow of ``E`` on the measure ``Σ ω̂_i δ_{x_i}`` (``ω̂ = ω / Σω``):
    ``x_i ← x_i − lr · ∇_{x_i}E / ω̂_i``, which moves every *pixel* at the speed the gradient asks for
    whatever the size of its palette bin; each point's step is capped at length ``max_step``. ``"adam"``
    uses Adam, which normalises every coordinate's step and so moves rare colours as fast as frequent ones
    (noisier). ``reg_covar=None`` uses ``1e-4 ×`` the largest covariance eigenvalue of ``target``.
    ``init``: the GMM the warm-started EM starts from (default: k-means++ on ``X``). ``frozen``: coordinates
    that keep their values (the flow moves the others). ``callback(i, loss, X)`` is called after every step
    (``loss`` a 0-d device tensor, see :func:`imgmw.flow.run_flow` for when to read it).
    Returns ``(X, flow result, the warm-started EM)``.
    """
    if optimizer not in ("gd", "adam"):
        raise ValueError(f"optimizer must be 'gd' or 'adam', got {optimizer!r}")
    reg = relative_reg_covar(target) if reg_covar is None else reg_covar
    em = WarmStartEM(target.n_components, init="kmeans++" if init is None else init, fixed_weights=fixed_weights,
                     reg_covar=reg, n_init_iter=30, policy=policy, generator=generator)
    free = [d for d in range(points.shape[-1]) if d not in frozen]
    fixed = points[:, list(frozen)].detach()

    def full(free_part: Tensor) -> Tensor:
        """``[M, D]`` points from the moving coordinates ``[M, D']`` and the frozen ones, in their order."""
        if not frozen:
            return free_part
        cols = dict(zip(free, free_part.unbind(-1))) | dict(zip(frozen, fixed.unbind(-1)))
        return torch.stack([cols[d] for d in range(points.shape[-1])], -1)

    def objective(x: Tensor, _: int) -> Tensor:
        return mw2(em(full(x), sample_weight=sample_weight), target, unbalanced=unbalanced)

    hook = None if callback is None else (lambda i, loss, x: callback(i, loss, full(x)))
    mass = sample_weight / sample_weight.sum() if optimizer == "gd" else None
    result = run_flow(points[:, free], objective, n_iter=n_iter, lr=lr, step=optimizer, point_mass=mass,
                      max_step=max_step if optimizer == "gd" else None, precondition=smooth, callback=hook)
    return full(result.x), result, em


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
        polish_kept: the polish step whose colours were kept (0: the regrained image's own; see
            :class:`_BestIterate`); ``losses`` still lists every polish step.
        seconds: wall time.
    """

    image: Tensor
    losses: list[float] = field(default_factory=list)
    refit_mw2: float = float("nan")
    fit: dict = field(default_factory=dict)
    n_colours: int = 0
    levels: int = 0
    polish_kept: int = 0
    seconds: float = 0.0


@renamed_parameters(k="n_components", iters="n_iter", polish_iters="polish_n_iter")
def transfer_colours(source: Tensor, target: Tensor, *, method: str = "flow", colorspace: str = "lab",
                     n_components: int = 20, n_iter: int = 100, lr: float = 0.2, optimizer: str = "gd",
                     max_step: float = 0.01,
                     max_colors: int = MAX_COLORS,
                     unbalanced: tuple[float, float] = (10.0, 0.1), map_method: str = "bary",
                     luminance: str = "match", regrain: bool = True, polish_n_iter: int = POLISH_ITERS,
                     fixed_weights: bool = False, policy: FitPolicy | None = COLOUR_POLICY,
                     generator: torch.Generator | None = None, seed: int | None = None,
                     diagnose: bool = True, callback: Callable[[int, Tensor, Callable[[], Tensor]], None] | None = None
                     ) -> ColourTransferResult:
    """Give ``source [3, H, W]`` the colours of ``target [3, H', W']`` (sRGB in [0, 1]); see the module doc.

    Args:
        method: ``"flow"``, ``"unbalanced"`` or ``"map"``.
        colorspace: ``"lab"``, ``"rgb"`` or ``"linear"``: where the GMMs live and the flow moves colours.
        n_components: mixture components on both sides.
        n_iter, lr, optimizer, max_step: steps, step size, step rule and per-colour step cap of the flows (see
            :func:`colour_flow`; colours are scaled to O(1) in every space).
        max_colors: bound on the palette size of the flows (see the module doc).
        unbalanced: ``(λ_source, λ_target)`` of the unbalanced method.
        map_method: ``"bary"`` or ``"rand"`` for ``method="map"``.
        luminance: ``"match"`` (Lab only): the flows keep L* at its monotone match to the target's
            (:func:`monotone_match`) and move a*, b*; ``"free"``: they move all three coordinates.
        regrain: post-process with :func:`imgmw.regrain.regrain` (the source's gradients, the result's colours).
        polish_n_iter: after regrain, steps of a short flow from the regrained image's palette that brings its
            colours back to the target (0: none; L* stays frozen with ``luminance="match"``).
        fixed_weights, policy: the mixtures' weighting and the warm start's fit-keeping policy.
        generator: draws the k-means++ starts and the random map (a ``torch.Generator`` on ``source``'s device;
            ``None``: torch's global generator). ``seed`` (an integer) is its deprecated former.
        diagnose: compute :attr:`ColourTransferResult.refit_mw2` (three fresh fits of the result's palette).
        callback: ``callback(i, loss, render)`` after every flow iteration (polish steps continue the count;
            ``loss`` a 0-d device tensor, read it at :func:`imgmw.flow.run_flow`'s sync points);
            ``render()`` returns the current recoloured image ``[3, H, W]`` (computed only when called).
    """
    check_choice("method", method, METHODS)
    check_choice("colorspace", colorspace, tuple(SPACE_SCALE))
    check_choice("luminance", luminance, LUMINANCE)
    if luminance == "match" and colorspace != "lab":
        raise ValueError(f"luminance='match' needs colorspace='lab' (L* is its first coordinate), got {colorspace!r}")
    if not isinstance(n_components, int) or n_components < 1:
        raise ValueError(f"n_components must be an integer >= 1, got {n_components!r}")
    if not isinstance(polish_n_iter, int) or polish_n_iter < 0:
        raise ValueError(f"polish_n_iter must be an integer >= 0, got {polish_n_iter!r}")
    for name, img in (("source", source), ("target", target)):
        if not isinstance(img, Tensor) or img.dim() != 3 or img.shape[0] != 3 or not img.is_floating_point():
            raise ValueError(f"{name} must be a float RGB image [3, H, W], got "
                             f"{tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__}")
        if not bool(torch.isfinite(img).all()):
            raise ValueError(f"{name} contains NaN or inf")
    t0 = time.perf_counter()
    gen = generator_from_seed(seed, generator, source.device, "transfer_colours")
    tgt_pal = build_palette(target, max_colors)
    tgt_gmm = fit_colour_gmm(tgt_pal, colorspace, n_components, generator=gen, fixed_weights=fixed_weights)
    tgt_pts = to_scaled_space(tgt_pal.colours, colorspace)
    reg = colour_reg_covar(tgt_pal, colorspace)
    palette = build_palette(source, max_colors)
    if palette.colours.shape[0] < n_components:
        raise ValueError(f"the source has only {palette.colours.shape[0]} distinct colours, fewer than "
                         f"n_components={n_components}")
    frozen = (0,) if luminance == "match" else ()
    lam = unbalanced if method == "unbalanced" else None

    def flow(image: Tensor, pal: Palette, steps: int, offset: int, polish: bool) -> tuple[Tensor, FlowResult,
                                                                                            WarmStartEM, int]:
        """The flow of ``pal`` (``image``'s palette) towards the target; the main flow first matches L*, the
        polish smooths its velocity over the palette and keeps its best iterate. Returns the recoloured image,
        the flow's result, its warm start and the number of steps whose colours were kept."""
        pts = to_scaled_space(pal.colours, colorspace)
        mass = pal.counts / pal.counts.sum()
        smooth = VelocitySmoother(pal.colours, mass, POLISH_SMOOTH) if polish else None
        if frozen and not polish:
            pts[:, 0] = monotone_match(pts[:, 0], pal.counts, tgt_pts[:, 0], tgt_pal.counts)

        def render(x: Tensor) -> Tensor:
            return apply_palette_lut(image, pal, from_scaled_space(x, colorspace))

        best = _BestIterate(pal, tgt_pal, colorspace) if polish else None
        if best is not None:
            best.offer(0, pts)

        def hook(i: int, loss: Tensor, x: Tensor) -> None:
            if best is not None and (i + 1) % POLISH_CHECK == 0:
                best.offer(i + 1, x)
            if callback is not None:
                callback(offset + i, loss, lambda: render(x))

        moved, result, em = colour_flow(pts, pal.counts, tgt_gmm, n_iter=steps, lr=lr, optimizer=optimizer,
                                        max_step=max_step, unbalanced=lam, reg_covar=reg,
                                        fixed_weights=fixed_weights, policy=policy, frozen=frozen, smooth=smooth,
                                        generator=gen, callback=hook)
        kept = steps
        if best is not None:
            if steps % POLISH_CHECK:
                best.offer(steps, moved)
            if best.x is not None:
                kept, moved = best.step, best.x
        return render(moved), result, em, kept

    kept = 0
    if method == "map":
        src_gmm = fit_colour_gmm(palette, colorspace, n_components, generator=gen, fixed_weights=fixed_weights)
        pts = to_scaled_space(image_to_points(source), colorspace)
        moved = gmm_ot_map(pts, src_gmm, tgt_gmm, method=map_method, generator=gen)
        image = points_to_image(from_scaled_space(moved, colorspace), source.shape[-2], source.shape[-1]).clamp(0, 1)
        losses, fit = [float(mw2(src_gmm, tgt_gmm))], {}
    else:
        image, result, em, _ = flow(source, palette, n_iter, 0, False)
        losses, fit = result.losses, em.diagnostics.as_dict()
    if regrain:
        image = grain.regrain(image, source)   # the function; `regrain` here is the flag
        if polish_n_iter:
            offset = 0 if method == "map" else n_iter
            image, result, _, kept = flow(image, build_palette(image, max_colors), polish_n_iter, offset, True)
            losses = losses + result.losses
    refit = float("nan")
    if diagnose:
        result_pal = build_palette(image, max_colors)
        refit = float(refit_mw2(to_scaled_space(result_pal.colours, colorspace), tgt_gmm,
                                sample_weight=result_pal.counts, fixed_weights=fixed_weights, reg_covar=reg,
                                unbalanced=lam, generator=gen))
    return ColourTransferResult(image, losses, refit, fit, palette.colours.shape[0], palette.levels, kept,
                                time.perf_counter() - t0)
