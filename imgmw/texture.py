"""Texture synthesis by multi-scale patch Mixture-Wasserstein matching (the paper's texture experiment).

Given an exemplar ``u [3, h, w]`` the synthesis ``x [3, H, W]`` (any size) minimises

    L(x) = Σ_{s=0}^{S−1} MW2²( EM_K(P_s(x)), ν_s ),

where ``P_s(x)`` is a random subset of the ``p×p`` patches (vectors of dimension ``D = 3p²``) of level
``s`` of the Gaussian pyramid of ``x`` (sides divided by ``2^s``), ``EM_K`` is a ``K``-component GMM
obtained by **one** EM step per call from the previous call's (detached) fit — warm-started EM, the
paper's Algorithm 3 — and ``ν_s`` is a ``K``-component GMM fitted once to the exemplar's patches at
level ``s``. Unlike the paper, the mixture weights are learned on both sides by default, with vanished
components re-seeded: with fixed uniform weights the synthesis's fits collapsed onto a single Gaussian
in our measurements (see :class:`PatchMW2Loss`). All scales are optimised together, over the pixels of
``x``, starting from a stationary Gaussian random field with the exemplar's mean and covariance
(:func:`gaussian_random_field`).

Pieces:

* :func:`gaussian_random_field` — asymptotic discrete spot noise (ADSN) initialisation.
* :func:`fit_patch_gmms` — the per-scale target mixtures ``ν_s``.
* :class:`PatchMW2Loss` — ``L`` as an ``nn.Module`` (exposes the per-scale terms).
* :func:`synthesize_texture` — the optimisation (:func:`imgmw.flow.run_flow`: Adam with a decaying step,
  or L-BFGS, on the pixels, clamped to [0, 1]), then a projection onto the exemplar's 8×8 patches
  (:mod:`imgmw.texture_refine`) and a short semi-dual patch OT finish from it with a sliced colour term
  (:mod:`imgmw.texture_semidual`, ``finish_n_iter``, ``finish_colour_weight``), whose single off-colour
  pixels are then replaced (:mod:`imgmw.texture_despeckle`, ``despeckle``); without the finish the
  projection is kept only when it does not raise the 4×4 patch sliced-W2.
* :func:`texture_scores` — the quality measures the app and the benchmarks report.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from .deprecation import renamed_parameters
from .flow import refit_mw2, run_flow
from .gmm import GMM
from .image import is_grey
from .losses import MW2Loss, data_reg_covar, fit_target, relative_reg_covar
from .metrics import COPY_RATIO, STRUCTURE_PATCH, near_copy_fraction, patch_sliced_w2, structure_distance
from .ot import gmm_barycentre, mw2
from .patches import gather_patches, gaussian_pyramid, n_scales_for, patch_grid, random_patches
from .texture_despeckle import remove_speckles
from .texture_refine import REFINE_ITERS, REFINE_PATCH, refine_texture, resize_image
from .texture_semidual import PATCH as SEMIDUAL_PATCH
from .texture_semidual import SCALES as SEMIDUAL_SCALES
from .texture_semidual import semidual_finish
from .validation import check_choice, check_positive_int, check_weight
from .warm import FitPolicy

__all__ = ["gaussian_random_field", "fit_patch_gmms", "PatchMW2Loss", "synthesize_texture",
           "texture_n_scales", "SynthesisResult", "OPTIMIZERS", "MIN_COARSE_SIDE", "DEFAULT_PATCHES", "TEXTURE_POLICY",
           "ADAM_LR", "patch_positions", "check_patch_counts", "texture_scores", "MW2_ITERS", "FINISH_ITERS",
           "FINISH_LR", "FINISH_PSI_STEPS", "FINISH_WARMUP", "FINISH_COLOUR_WEIGHT"]

OPTIMIZERS = ("adam", "lbfgs")
MIN_COARSE_SIDE = 16          # the paper's rule: the coarsest pyramid level keeps sides >= 16 px
TARGET_PATCHES = 8192         # exemplar patches per scale used to fit ν_s (all of them if fewer)
TARGET_ITERS = 150            # maximum EM steps of each target fit (k-means++ start)
MIN_WEIGHT = 0.05             # learned weights below MIN_WEIGHT / K trigger a re-seed (imgmw.warm.FitPolicy)
TEXTURE_POLICY = FitPolicy(min_weight=MIN_WEIGHT)  # the synthesis's default fit keeping
DEFAULT_PATCHES = 2048        # patches drawn per scale per optimiser step
COARSE_SHARE = 0.4  # synthesize_texture(stages > 1): fraction of the steps spent at the coarsest size
REFINE_KEEP = 1.0             # keep the projection if its patch sliced-W2 is <= REFINE_KEEP × the MW2 result's
ADAM_LR = 0.03                # initial Adam step (decayed linearly to 0), see synthesize_texture
MW2_ITERS = 300               # default MW2 flow steps of synthesize_texture
FINISH_ITERS = 60             # semi-dual patch OT iterations after the projection (0: none)
FINISH_LR = 0.02              # their Adam step, decayed linearly to 0
FINISH_PSI_STEPS = 5          # ψ ascent steps per finish iteration (the baseline: 10)
FINISH_WARMUP = 50            # ψ ascent steps before the first finish iteration
FINISH_COLOUR_WEIGHT = 50.0   # weight of the sliced colour W2² in the finish's image step (0: none)
EIG_FLOOR = 1e-10             # relative eigenvalue floor of the colour pseudo-inverse square root


# ------------------------------------------------------------------------------------------- checks

def _as_image(img: Tensor, name: str) -> Tensor:
    """``[3, H, W]`` or ``[1, 3, H, W]`` finite float tensor → ``[1, 3, H, W]``."""
    if not isinstance(img, Tensor) or img.dim() not in (3, 4) or img.shape[-3] != 3 or \
            (img.dim() == 4 and img.shape[0] != 1):
        shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
        raise ValueError(f"{name} must be an RGB image tensor [3, H, W] or [1, 3, H, W], got {shape}")
    if not img.is_floating_point() or not bool(torch.isfinite(img).all()):
        raise ValueError(f"{name} must be a finite float tensor, got dtype {img.dtype}")
    return img if img.dim() == 4 else img.unsqueeze(0)


def _exemplar_list(exemplar: Tensor | Sequence[Tensor], mix: Sequence[float] | Tensor | None
                   ) -> tuple[list[Tensor], list[float]]:
    """Exemplars as ``[1, 3, H, W]`` tensors and their mixing weights ``λ`` (normalised to sum to one)."""
    images = [exemplar] if isinstance(exemplar, Tensor) else list(exemplar)
    if not images:
        raise ValueError("give at least one exemplar")
    images = [_as_image(img, f"exemplar {i}" if len(images) > 1 else "exemplar").detach()
              for i, img in enumerate(images)]
    if mix is None:
        lam = [1.0 / len(images)] * len(images)
    else:
        lam = [float(v) for v in mix]
        if len(lam) != len(images) or not all(math.isfinite(v) and v >= 0 for v in lam) or sum(lam) <= 0:
            raise ValueError(f"mix must be {len(images)} finite weights >= 0, not all zero (one per exemplar), "
                             f"got {list(mix)!r}")
        lam = [v / sum(lam) for v in lam]
    if len({(img.dtype, img.device) for img in images}) > 1:
        raise ValueError("the exemplars must share dtype and device")
    return images, lam


def _common_size(images: list[Tensor]) -> tuple[int, int]:
    """The smallest height and width over the exemplars (what limits the pyramid)."""
    return min(img.shape[-2] for img in images), min(img.shape[-1] for img in images)


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(v, int) and v >= 1 for v in size)):
        raise ValueError(f"size must be a pair of positive ints (H, W), got {size!r}")
    return int(size[0]), int(size[1])


def texture_n_scales(exemplar_hw: tuple[int, int], output_hw: tuple[int, int], patch: int,
                     n_scales: int | None = None) -> int:
    """Number of pyramid levels ``S`` for an exemplar and an output of the given ``(H, W)`` sizes.

    ``None`` picks the paper's rule: the largest ``S`` whose coarsest level keeps sides ``>= 16`` px
    (``>= patch`` if larger) in both images (:func:`imgmw.patches.n_scales_for`). Raises ValueError when
    a level of either image (sides ``⌊side / 2^s⌋``) would be smaller than ``patch``.
    """
    check_positive_int("patch", patch)
    if n_scales is None:
        min_side = max(MIN_COARSE_SIDE, patch)
        n_scales = min(n_scales_for(*exemplar_hw, min_side), n_scales_for(*output_hw, min_side))
    check_positive_int("n_scales", n_scales)
    for name, (h, w) in (("exemplar", exemplar_hw), ("output", output_hw)):
        coarse = min(h, w) >> (n_scales - 1)
        if coarse < max(patch, 2 if n_scales > 1 else 1):
            raise ValueError(
                f"the {name} ({h}x{w}) is too small for {patch}x{patch} patches at {n_scales} scale(s): its "
                f"coarsest level has a side of {coarse} px; use a larger {name}, fewer scales or a smaller patch")
    return n_scales


def patch_positions(hw: tuple[int, int], patch: int, n_scales: int,
                    periodic: bool = False) -> list[tuple[int, int, int]]:
    """``[(h_s, w_s, positions_s)]`` for the ``n_scales`` pyramid levels of an ``(H, W)`` image (sides
    ``⌊side / 2^s⌋``): the number of ``patch × patch`` positions, ``h·w`` when ``periodic`` (patches wrap)
    and ``(h − p + 1)(w − p + 1)`` otherwise."""
    out, (h, w) = [], hw
    for _ in range(n_scales):
        out.append((h, w, h * w if periodic else max(0, h - patch + 1) * max(0, w - patch + 1)))
        h, w = h // 2, w // 2
    return out


def check_patch_counts(exemplar_hw: tuple[int, int], output_hw: tuple[int, int], patch: int, n_scales: int,
                       n_components: int, n_patches: int, periodic: bool = False, *,
                       names: dict[str, str] | None = None) -> None:
    """ValueError, before any fit, when a scale cannot supply ``n_components`` patches: ``n_patches`` below
    ``n_components`` (each output fit draws ``n_patches`` patches), or a level of the exemplar or of the
    output with fewer patch positions than components. Messages name the parameters as ``names`` maps them
    (e.g. ``{"n_components": "--k"}`` for a command line; default: the parameter names)."""
    name = {"n_components": "n_components", "n_patches": "n_patches", "patch": "patch", "n_scales": "n_scales",
            "exemplar": "exemplar", "output": "output"} | (names or {})
    k, n = name["n_components"], name["n_patches"]
    if n_patches < n_components:
        raise ValueError(f"{n} {n_patches} is below {k} {n_components}: every scale's output fit needs at least "
                         f"one patch per component; raise {n} or lower {k}")
    for what, hw, wrap in (("exemplar", exemplar_hw, False), ("output", output_hw, periodic)):
        for h, w, count in patch_positions(hw, patch, n_scales, wrap):
            if count < n_components:
                raise ValueError(f"{k} {n_components} is more than the {count} positions of {patch}x{patch} "
                                 f"patches on the {what}'s {h}x{w} level; lower {k} or {name['patch']}, use "
                                 f"fewer {name['n_scales']} or a larger {name[what]}")


# ---------------------------------------------------------------------------------- Gaussian random field

def _psd_power(cov: Tensor, power: float) -> Tensor:
    """``cov^power`` for symmetric PSD ``cov [C, C]``; eigenvalues below ``EIG_FLOOR·λ_max`` count as 0
    (so ``power < 0`` gives the pseudo-inverse power)."""
    lam, vec = torch.linalg.eigh(cov)
    keep = lam > EIG_FLOOR * lam.max().clamp_min(torch.finfo(lam.dtype).tiny)
    scaled = torch.where(keep, lam.clamp_min(torch.finfo(lam.dtype).tiny).pow(power), torch.zeros_like(lam))
    return (vec * scaled) @ vec.mT


def _spot(exemplar: Tensor, max_height: int, max_width: int) -> tuple[Tensor, Tensor]:
    """``(mean [3, 1, 1], spot [3, h', w'])``: the exemplar minus its mean, centrally cropped to at most
    ``max_height × max_width``, divided by ``sqrt(h'·w')`` and colour-corrected so that ``Σ_y t(y) t(y)ᵀ`` equals
    the exemplar's colour covariance ``C = (1/hw) Σ (u − m)(u − m)ᵀ`` also after cropping:
    ``t ← C^½ C_t^{−½} t`` with ``C_t`` the cropped spot's ``Σ t tᵀ`` (identity when nothing is cropped)."""
    mean = exemplar.mean(dim=(-2, -1), keepdim=True)
    centred = exemplar - mean
    h, w = centred.shape[-2:]
    hs, ws = min(h, max_height), min(w, max_width)
    top, left = (h - hs) // 2, (w - ws) // 2
    spot = centred[:, top:top + hs, left:left + ws] / math.sqrt(hs * ws)
    if (hs, ws) != (h, w):
        full = centred.flatten(1)
        cov = full @ full.T / full.shape[1]
        flat = spot.flatten(1).double()
        correction = _psd_power(cov.double(), 0.5) @ _psd_power(flat @ flat.T, -0.5)
        spot = (correction @ flat).to(exemplar.dtype).reshape(spot.shape)
    return mean, spot


def gaussian_random_field(exemplar: Tensor, size: tuple[int, int], *, periodic: bool = False,
                          generator: torch.Generator | None = None) -> Tensor:
    """A stationary Gaussian random field ``[3, H, W]`` with the exemplar's colour mean and covariance.

    Asymptotic discrete spot noise (ADSN, Galerne–Gousseau–Morel): with ``m`` the exemplar's mean
    colour, ``t = (u − m)/sqrt(hw)`` its normalised spot and ``W`` one scalar white-noise field shared
    by the three channels,

        f(x) = m + Σ_y t(y) W(x − y),     so  E f = m,  Cov f(x) = Σ_y t(y) t(y)ᵀ = C_u

    (and the field's spatial autocovariance is the exemplar's autocorrelation). The convolution is an
    FFT product on a canvas: ``periodic=False`` uses a canvas of ``(H + h − 1) × (W + w − 1)`` and keeps
    the wrap-free ``H × W`` window (a linear convolution: stationary, not tileable); ``periodic=True``
    convolves circularly on the ``H × W`` torus, so the field tiles seamlessly; if the exemplar is larger
    than the output there, its spot is centrally cropped to fit and colour-corrected (see :func:`_spot`).

    Args:
        exemplar: ``[3, h, w]`` (or ``[1, 3, h, w]``) float image.
        size: output ``(H, W)``.
        periodic: tileable field.
        generator: ``torch.Generator`` of the white noise (drawn on its device, default CPU, then moved to
            the exemplar's device), so a seed gives the same field on every device.

    Returns:
        ``[3, H, W]`` field in the exemplar's dtype and device (not clamped to [0, 1]).
    """
    u = _as_image(exemplar, "exemplar")[0]
    height, width = _check_size(size)
    mean, spot = _spot(u, height, width) if periodic else _spot(u, *u.shape[-2:])
    hs, ws = spot.shape[-2:]
    canvas = (height, width) if periodic else (height + hs - 1, width + ws - 1)
    device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(canvas, generator=generator, device=device, dtype=u.dtype).to(u.device)
    spectrum = torch.fft.rfft2(spot, s=canvas) * torch.fft.rfft2(noise)
    field = torch.fft.irfft2(spectrum, s=canvas)
    if not periodic:  # entries with index >= spot side - 1 never wrap around the canvas
        field = field[:, hs - 1:hs - 1 + height, ws - 1:ws - 1 + width]
    return (field + mean).contiguous()


# ------------------------------------------------------------------------------------------ target GMMs

def _level_patches(level: Tensor, patch: int, n: int, generator: torch.Generator | None) -> Tensor:
    """``[N', D]`` patches of one pyramid level ``[1, 3, h, w]``: all of them if ``N <= n``, else ``n``
    drawn without replacement."""
    total = math.prod(patch_grid(level.shape[-2], level.shape[-1], patch))
    if total <= n:
        positions = torch.arange(total, device=level.device)
        return gather_patches(level, patch, positions)[0]
    return random_patches(level, patch, n, generator)[0]


def _fit_levels(exemplar: Tensor, patch: int, n_components: int, n_scales: int, n_patches: int, n_iter: int,
                fixed_weights: bool, generator: torch.Generator | None) -> list[tuple[GMM, float]]:
    """``(ν_s, ε_r of level s)`` for every level (see :func:`fit_patch_gmms`)."""
    u = _as_image(exemplar, "exemplar")
    for name, value in (("patch", patch), ("n_components", n_components), ("n_scales", n_scales),
                        ("n_patches", n_patches), ("n_iter", n_iter)):
        check_positive_int(name, value)
    texture_n_scales(_hw(u), _hw(u), patch, n_scales)
    out = []
    for level in gaussian_pyramid(u, n_scales):
        x = _level_patches(level, patch, n_patches, generator)
        if x.shape[0] < n_components:
            raise ValueError(f"the exemplar has only {x.shape[0]} patches at a {level.shape[-2]}x"
                             f"{level.shape[-1]} level, fewer than n_components={n_components}")
        reg = data_reg_covar(x)
        out.append((fit_target(x, n_components, fixed_weights=fixed_weights, reg_covar=reg, n_iter=n_iter,
                               generator=generator), reg))
    return out


@torch.no_grad()
def fit_patch_gmms(exemplar: Tensor, patch: int, n_components: int, n_scales: int, *,
                   n_patches: int = TARGET_PATCHES, n_iter: int = TARGET_ITERS, fixed_weights: bool = False,
                   generator: torch.Generator | None = None) -> list[GMM]:
    """The targets ``ν_s``: one ``K``-component GMM ``[K, D]`` (``D = 3·patch²``) per pyramid level.

    Level ``s`` of the exemplar's Gaussian pyramid (reflect borders; the exemplar is not assumed
    periodic) gives up to ``n_patches`` patches; a GMM (uniform weights kept if ``fixed_weights``) is
    fitted to them by :func:`imgmw.losses.fit_target` (at most ``n_iter`` EM steps from k-means++,
    ``reg_covar = 1e-4 × λ_max`` of the patches' covariance, the value the synthesis's fits use too).
    The fits should be near an EM fixed point: the synthesis's warm-started fits start from them (see
    :class:`PatchMW2Loss`).
    """
    return [gmm for gmm, _ in _fit_levels(exemplar, patch, n_components, n_scales, n_patches, n_iter,
                                          fixed_weights, generator)]


def _given_targets(targets: Sequence[GMM], patch: int, n_scales: int | None,
                   like: Tensor) -> list[tuple[GMM, float]]:
    """``(ν_s, ε_r)`` for given target mixtures (see :class:`PatchMW2Loss`), checked against ``patch`` and
    moved to the dtype and device of ``like``."""
    targets = list(targets)
    if not targets or not all(isinstance(t, GMM) and t.batch_shape == () for t in targets):
        raise ValueError("targets must be a non-empty list of unbatched GMMs, one per scale")
    d = 3 * patch * patch
    if any(t.n_features != d for t in targets):
        raise ValueError(f"targets have D={targets[0].n_features}, patches of side {patch} have D={d}")
    if len({t.n_components for t in targets}) != 1:
        raise ValueError("targets must have the same number of components at every scale")
    if n_scales is not None and n_scales != len(targets):
        raise ValueError(f"n_scales={n_scales} differs from the {len(targets)} given targets")
    return [(t.detach().to(device=like.device, dtype=like.dtype), relative_reg_covar(t)) for t in targets]


# ------------------------------------------------------------------------------------------------- loss

class PatchMW2Loss(nn.Module):
    """Multi-scale patch ``MW2²`` loss of an image against an exemplar (see the module docstring).

    Args:
        exemplar: ``[3, h, w]`` or ``[1, 3, h, w]`` float image; its dtype and device are the loss's. A list
            of exemplars is a texture **mix**: at every scale the target is the MW2 barycentre
            (:func:`imgmw.gmm_barycentre`, weights ``mix``) of the exemplars' patch mixtures, with the
            ``mix``-weighted mean of their ``reg_covar``; the pyramid follows the smallest exemplar.
        patch: patch side ``p`` (patch vectors have ``D = 3p²`` entries).
        n_components: ``K`` on both sides.
        n_scales: pyramid levels ``S``; ``None``: the most whose coarsest exemplar level keeps sides
            ``>= max(16, p)``. The image passed to :meth:`forward` must also be large enough for them.
        n_patches: patches drawn per scale per call (all of them when a level has fewer); positions are
            i.i.d. uniform over the level's patch grid and gathered by index, so no call builds all patches.
        periodic: the synthesis wraps around (circular pyramid blur and patches crossing the borders),
            so minimising the loss makes it tileable. The exemplar is never treated as periodic.
        generator: ``torch.Generator`` for the target fits' k-means++, the patch draws and the warm
            starts' first fits (drawn on the generator's device, default CPU).
        fixed_weights: keep uniform weights ``1/K`` in every fit (the paper's default); ``False`` (the
            default here) lets EM estimate them on both sides — see below.
        policy: the warm starts' :class:`imgmw.warm.FitPolicy` (default: re-seed learned weights below
            ``MIN_WEIGHT / K``); ``None``: the paper's plain Algorithm 3.
        mix: ``λ``, one weight ``>= 0`` per exemplar (normalised to sum to one; default uniform).
        n_target_patches, n_target_iter: see :func:`fit_patch_gmms`.
        n_init_iter: EM steps of the first fit of the synthesis at each scale (started from ``ν_s``).
        targets: given target mixtures ``ν_s``, finest first, each ``[K, 3p²]`` (e.g. the per-scale GMMs of
            a patch prior, :mod:`imgmw.prior`); they replace the exemplar fits (``n_scales`` is their number and
            ``n_components`` their ``K``; ``reg_covar`` is :func:`imgmw.losses.relative_reg_covar` of each);
            ``exemplar`` then only sets the pyramid's size check.
        process_group: ``torch.distributed`` group over which the images passed to :meth:`forward` are sharded
            (each rank its own images, e.g. a generator's samples under DistributedDataParallel): every scale's
            fit runs over the patches of all ranks (:class:`imgmw.MW2Loss`); every rank must build the loss
            from the same exemplar and seed (the targets are checked to agree).

    Each scale is an :class:`imgmw.MW2Loss` with a warm-started EM (one EM step per call from the
    previous call's repaired, detached parameters) and the ``reg_covar`` of its target fit
    (``1e-4 × λ_max`` of the exemplar's patch covariance at that level). The first fit starts **from
    the target** ``ν_s`` instead of k-means++: two k-means++ fits of the *same* patches land in different
    local optima whose ``MW2²`` is far from 0, so the exemplar itself scored only 2–3× below noise
    (64×64 crops of wood and brick, 2 scales, loss after five calls, three seeds); started from ``ν_s``
    it scores 3–9× (wood) and 16–50× (brick) below noise, and the syntheses were as good (brick,
    patch-SW ratios within ±0.25 of k-means++ starts over three seeds).

    Why learned weights and re-seeding (first measured, before the fit-keeping policy, with k-means++ starts on 64×64
    crops of ``data/wood.png`` and ``data/brick.png``, 48×48 outputs, 2 scales, Adam lr 0.01, 100 steps;
    ratio = patch-SW of the noise start / patch-SW of the result, higher is better): with fixed uniform
    weights the fits' components lose their points one after the other within ~20 steps (a component
    holding few points can match its target cheaply, and a fixed weight does not charge for the missing
    mass) until one Gaussian holds all patches; the ratios were 0.62 (wood, worse than the start) and
    1.22 (brick). Learned weights: 1.70 (brick); learned weights with re-seeding: 2.76 (wood) and 2.14
    (brick).

    Attributes:
        last_per_scale: ``[S]`` detached values of the last call's per-scale terms (for progress bars).

    Example:
        >>> exemplar = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))   # [3, H, W] in [0, 1]
        >>> loss_fn = PatchMW2Loss(exemplar, patch=4, n_scales=2, generator=torch.Generator().manual_seed(0))
        >>> x = gaussian_random_field(exemplar, (64, 64)).unsqueeze(0).requires_grad_()
        >>> loss_fn(x).backward()     # x.grad: the pixel gradient of Σ_s MW2²
        >>> x.grad.shape
        torch.Size([1, 3, 64, 64])
    """

    def __init__(self, exemplar: Tensor | Sequence[Tensor], patch: int = 4, n_components: int = 4,
                 n_scales: int | None = None, n_patches: int = DEFAULT_PATCHES, periodic: bool = False,
                 generator: torch.Generator | None = None, *, mix: Sequence[float] | Tensor | None = None,
                 fixed_weights: bool = False, policy: FitPolicy | None = TEXTURE_POLICY,
                 n_target_patches: int = TARGET_PATCHES, n_target_iter: int = TARGET_ITERS,
                 n_init_iter: int = 10, process_group=None, targets: Sequence[GMM] | None = None) -> None:
        super().__init__()
        images, lam = _exemplar_list(exemplar, mix)
        hw = _common_size(images)
        check_positive_int("patch", patch)
        check_positive_int("n_patches", n_patches)
        check_positive_int("n_init_iter", n_init_iter)
        if targets is not None:  # given mixtures (e.g. a folder's patch prior): no exemplar fits
            pairs = _given_targets(targets, patch, n_scales, images[0])
            n_scales, n_components = len(pairs), pairs[0][0].n_components
        else:
            if n_scales is None:
                n_scales = texture_n_scales(hw, hw, patch)
            fits = [_fit_levels(u, patch, n_components, n_scales, n_target_patches, n_target_iter, fixed_weights,
                                generator) for u in images]
            # texture mixing: each scale's target is the MW2 barycentre of the exemplars' patch mixtures
            pairs = fits[0] if len(images) == 1 else [
                (gmm_barycentre([f[s][0] for f in fits], lam),
                 sum(weight * f[s][1] for weight, f in zip(lam, fits))) for s in range(n_scales)]
        self.mix = lam
        self.patch, self.n_components, self.n_scales = patch, n_components, n_scales
        self.n_patches, self.periodic, self.generator = n_patches, bool(periodic), generator
        self.fixed_weights = fixed_weights
        self.exemplar_size = hw
        self.scales = nn.ModuleList(
            MW2Loss(t, warm_start=True, fixed_weights=fixed_weights, reg_covar=reg, n_iter=n_init_iter,
                    policy=policy, generator=generator, process_group=process_group) for t, reg in pairs)
        self._positions: list[Tensor] | None = None
        self._drawn_grids: list[int] = []   # the patch-grid sizes the kept positions were drawn on
        self.last_per_scale: Tensor | None = None

    def _losses(self) -> list[MW2Loss]:
        return [cast(MW2Loss, loss) for loss in self.scales]

    @property
    def targets(self) -> list[GMM]:
        """The exemplar's patch mixtures ``ν_s``, finest first."""
        return [loss.target for loss in self._losses()]

    def reset(self) -> None:
        """Forget the warm-start fits and the drawn positions (the next call starts afresh)."""
        for loss in self._losses():
            loss.reset()
        self._positions, self._drawn_grids = None, []

    def _grid_sizes(self, levels: list[Tensor]) -> list[int]:
        return [math.prod(patch_grid(lv.shape[-2], lv.shape[-1], self.patch, self.periodic)) for lv in levels]

    def resample(self, levels: list[Tensor]) -> list[Tensor]:
        """Draw new patch positions ``[n_s]`` for every level ``[B, 3, h_s, w_s]`` and keep them."""
        device = self.generator.device if self.generator is not None else torch.device("cpu")
        positions, grids = [], self._grid_sizes(levels)
        for level, total in zip(levels, grids):
            if total <= self.n_patches:
                pos = torch.arange(total, device=level.device)
            else:
                pos = torch.randint(total, (self.n_patches,), generator=self.generator, device=device)
            positions.append(pos.to(level.device))
        self._positions, self._drawn_grids = positions, grids
        return positions

    def _levels(self, image: Tensor) -> list[Tensor]:
        if not isinstance(image, Tensor) or image.dim() != 4 or image.shape[1] != 3:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"image must be a tensor [B, 3, H, W], got {shape}")
        texture_n_scales(self.exemplar_size, _hw(image), self.patch, self.n_scales)
        return gaussian_pyramid(image, self.n_scales, periodic=self.periodic)

    def per_scale(self, image: Tensor, *, resample: bool = True) -> Tensor:
        """``[S]``: ``MW2²(EM_K(P_s(image)), ν_s)`` of every scale for ``image [B, 3, H, W]`` (mean over the
        batch). ``resample=False`` reuses the previous call's patch positions (for line searches, e.g.
        L-BFGS, that evaluate one objective several times); the warm-start fits still advance. Positions drawn
        on patch grids of other sizes (an image of another size) are drawn anew."""
        levels = self._levels(image)
        positions = self._positions
        if resample or positions is None or self._drawn_grids != self._grid_sizes(levels):
            positions = self.resample(levels)
        fits = []
        for loss, level, pos in zip(self._losses(), levels, positions):
            loss.start_from_target(image.shape[:1])
            # positions come from resample() on this grid: in range, no host check needed
            patches = gather_patches(level, self.patch, pos, self.periodic, check_input=False)
            fits.append(loss.fit(patches, check_finite=False))  # a non-finite fit fails in mw2's linear program
        # every scale's fit has the same K and D: one MW2 call for all scales, one linear-program transfer
        bshape, k, d = fits[0].batch_shape, fits[0].n_components, fits[0].n_features
        targets = GMM.stack([GMM(t.weights.expand(*bshape, k), t.means.expand(*bshape, k, d),
                                 t.covariances.expand(*bshape, k, d, d))
                             for t in (loss.target for loss in self._losses())])
        per_scale = mw2(GMM.stack(fits), targets, check_input=False).mean(-1)  # [S, B] → [S]
        self.last_per_scale = per_scale.detach()
        return per_scale

    def forward(self, image: Tensor, *, resample: bool = True) -> Tensor:
        """``Σ_s MW2²(EM_K(P_s(image)), ν_s)`` for ``image [B, 3, H, W]``: a scalar (see :meth:`per_scale`)."""
        return self.per_scale(image, resample=resample).sum()

    @torch.no_grad()
    def refit_mw2(self, image: Tensor, *, n_patches: int = TARGET_PATCHES) -> Tensor:
        """``[S]``: :func:`imgmw.flow.refit_mw2` of every scale, from ``n_patches`` random patches of
        ``image [1, 3, H, W]`` (with the scale's ``reg_covar`` and weighting): what the loss would be if its
        fits were fresh."""
        out = []
        for loss, level in zip(self._losses(), self._levels(image)):
            x = _level_patches(level, self.patch, n_patches, self.generator)
            out.append(refit_mw2(x, loss.target, fixed_weights=self.fixed_weights, reg_covar=loss.reg_covar,
                                 generator=self.generator))
        return torch.stack(out)

    @property
    def fit_diagnostics(self) -> list[dict]:
        """Per scale, what the warm starts' fit-keeping policy did (:meth:`imgmw.warm.FitDiagnostics.as_dict`)."""
        return [{} if loss.em is None else loss.em.diagnostics.as_dict() for loss in self._losses()]


# ----------------------------------------------------------------------------------------- optimisation

@dataclass
class SynthesisResult:
    """Output of :func:`synthesize_texture`.

    Attributes:
        image: ``[3, H, W]`` synthesis in [0, 1].
        init: ``[3, H, W]`` the Gaussian-random-field start, clamped to [0, 1].
        losses: ``[T, S]`` per-scale loss at every step (before that step's update).
        seconds: wall time of the optimisation loop (excluding the target fits).
        setup_seconds: wall time of the target fits and the initialisation.
        n_scales: ``S``.
        refit_mw2: ``[S]`` per-scale MW2² of fresh fits of the result's patches (``None`` unless diagnosed).
        fit: per scale, what the fit-keeping policy did.
        unrefined: ``[3, H, W]`` the MW2 synthesis before the patch projection (``image`` itself unless
            ``refined``).
        refined: whether ``image`` is the patch projection of ``unrefined``.
        refine_seconds: wall time of the patch projection (:func:`imgmw.texture_refine.refine_texture`).
        finished: whether ``image`` went through the semi-dual patch OT finish (:mod:`imgmw.texture_semidual`).
        finish_seconds: wall time of that finish.
        finish_losses: ``[T_f, S_f]`` its per-scale semi-dual costs at every step (``None`` without a finish).
        speckles: pixels replaced after the finish (:func:`imgmw.texture_despeckle.remove_speckles`).
    """

    image: Tensor
    init: Tensor
    losses: Tensor
    seconds: float
    setup_seconds: float
    n_scales: int
    refit_mw2: Tensor | None = None
    fit: list = field(default_factory=list)
    unrefined: Tensor | None = None
    refined: bool = False
    refine_seconds: float = 0.0
    finished: bool = False
    finish_seconds: float = 0.0
    finish_losses: Tensor | None = None
    speckles: int = 0


@renamed_parameters(iters="n_iter")
def synthesize_texture(exemplar: Tensor | Sequence[Tensor], size: tuple[int, int], *, patch: int = 4,
                       n_components: int = 4, n_scales: int | None = None, n_patches: int = DEFAULT_PATCHES,
                       n_iter: int = MW2_ITERS, lr: float | None = None, optimizer: str = "adam",
                       periodic: bool = False, mix: Sequence[float] | Tensor | None = None, init: Tensor | None = None,
                       stages: int = 1,
                       fixed_weights: bool = False, policy: FitPolicy | None = TEXTURE_POLICY,
                       diagnose: bool = True, generator: torch.Generator | None = None,
                       callback: Callable[[int, Tensor, Tensor], None] | None = None,
                       targets: Sequence[GMM] | None = None, refine_n_iter: int = REFINE_ITERS,
                       finish_n_iter: int = FINISH_ITERS,
                       finish_colour_weight: float = FINISH_COLOUR_WEIGHT, despeckle: bool = True) -> SynthesisResult:
    """Synthesise an ``H × W`` texture like ``exemplar`` by minimising :class:`PatchMW2Loss`.

    ``refine_n_iter``: iterations per level of the final patch projection onto the exemplar
    (:func:`imgmw.texture_refine.refine_texture`: 8×8 exemplar patches, coarse to fine; ``0``: none). The MW2
    flow lays out the texture with the exemplar's patch statistics; the projection replaces every 8×8 patch by
    its nearest exemplar patch, which reconnects broken structures and removes the grain. It is **kept only
    if** it does not raise the 4×4 patch sliced-W2 to the exemplar (:data:`REFINE_KEEP`): on stochastic or
    sparse textures (gravel, wood grain, galaxies, the thin veins) nearest-patch projection washes out to the
    exemplar's commonest low-contrast patches, which that measure sees (measured in
    ``benchmarks/bench_structure.py``). It applies to one exemplar (or a mix with one non-zero weight) of at
    least 8×8 pixels and an output as large, not with given ``targets``; ``result.unrefined`` is the MW2-only
    image, ``result.refined`` says which one ``result.image`` is.

    ``finish_n_iter``: iterations of the final **semi-dual patch OT finish** (:func:`imgmw.texture_semidual.
    semidual_finish`, Houdard et al.'s multi-scale 4×4 patch OT with a dual ``ψ`` per scale over 2000 exemplar
    patches; ``0``: none, the result is then the MW2 flow with the projection rule above). With a finish the
    projection is always applied and the finish starts from it: the projection snaps the MW2 layout onto real
    exemplar patches (connected veins, continuous mortar, but washed out, with many near-copies) and the finish's
    ψ ascent, which makes every target patch receive the same share of synthesis patches, undoes the wash-out and
    the copying while keeping the structure (Adam, ``FINISH_LR`` decayed linearly, ``FINISH_PSI_STEPS`` ascent
    steps per iteration after ``FINISH_WARMUP``). ``finish_colour_weight`` ``λ`` adds ``λ`` × the sliced W2² of
    the pixel colours (:class:`imgmw.colour_loss.SlicedColourLoss`) to the finish's image step: without it the
    finish faded sparse bright details and fine grain (256², 150 MW2 steps, 60 finish iterations, seed 0, patch
    sliced-W2 / structure distance: hubble 0.0383 / 0.0275 with ``λ = 0``, 0.0099 / 0.0312 with 100; gravel
    0.0123 / 0.1129 and 0.0059 / 0.1219); larger ``λ`` trades structure for patch statistics (veins 0.0088 /
    0.0380 at 30, 0.0067 / 0.0424 at 100), hence the default 50. ``benchmarks/bench_texture.py`` with these
    defaults (300 MW2 steps, 60 finish iterations, ``λ = 50``) is no worse than the 500-iteration semi-dual
    baseline on both scores on wood and gravel (brick's structure distance is 0.1 % above the baseline's), and
    better on one of the two on veins, bricks and hubble; stripes is worse on both (see the README). Applies to one
    exemplar (or a mix with one non-zero weight), not with given ``targets``; ``result.finished`` says whether it
    ran. ``callback`` receives its steps after the flow's (numbered on, with the finish's per-scale costs).

    ``despeckle``: after the finish, replace the single pixels whose ``3×3`` neighbourhood the exemplar has
    except for their own colour (:func:`imgmw.texture_despeckle.remove_speckles`, threshold calibrated on the
    exemplar; ``result.speckles`` counts them, its time is in ``finish_seconds``). The colour term leaves such a
    grain on flat regions (applied to ``benchmarks/bench_structure.py``'s 128² seed-0 results: 1181 pixels on
    stripes, structure distance / crop 1.08 → 1.00, patch sliced-W2 0.0316 → 0.0336; bricks 959, 1.86 → 1.80,
    0.0135 → 0.0154), and next to none on stochastic textures (gravel 12, hubble 13, wood 0); at 256² see the
    README.

    ``targets``: given per-scale patch mixtures (e.g. a folder's prior, :mod:`imgmw.prior`) replace the
    exemplar's fits (:class:`PatchMW2Loss`); the exemplar still gives the noise start. Not with ``stages > 1``.

    ``exemplar`` may be a list with ``mix`` weights (texture mixing, see :class:`PatchMW2Loss`); the noise
    start then has the colour statistics of the exemplar with the largest weight. ``init`` (``[3, H, W]``)
    replaces the noise start (e.g. an upsampled coarser synthesis).

    ``stages > 1`` synthesises coarse to fine: ``n_iter`` steps in all, ``COARSE_SHARE`` of them at
    ``1/2^(stages−1)`` of the output size against
    the exemplars reduced as much (:func:`imgmw.patches.gaussian_pyramid`; the pyramid depth of each coarser
    stage by the default rule), the result upsampled (bilinear; circularly padded when ``periodic``) as the
    next stage's start, up to the full size (``n_scales`` there); the other stages share the remaining steps
    equally. Long structures are laid out where a 4×4 patch sees them, then refined (measured in
    ``benchmarks/bench_structure.py``, the README's texture section: with 300 steps in all, the structure
    distance fell on all three drawn exemplars; single-seed numbers that move by several per cent with the
    seed). The result's ``losses``, ``init``,
    ``n_scales``, ``refit_mw2`` and ``fit`` are the final stage's; ``seconds`` and ``setup_seconds`` add up
    the stages; ``callback`` steps count on across stages.

    The pixels start at :func:`gaussian_random_field` (``periodic`` as requested) clamped to [0, 1] and
    are optimised by Adam (``lr`` default 0.03, decayed linearly to 0 over ``n_iter`` steps) or L-BFGS
    (``lr`` default 1, strong-Wolfe line search, one L-BFGS iteration per step, its evaluations sharing
    one patch draw). After every step the pixels are clamped to [0, 1] (a projection onto the valid image
    range, so the loss never sees values a PNG cannot hold); the loop is :func:`imgmw.flow.run_flow`.
    ``callback(step, per_scale [S], image [1, 3, H, W])`` (the flows' signature: step, loss, state) runs after
    each step (``per_scale`` on the device:
    read it at :func:`imgmw.flow.run_flow`'s sync points, ``(step + 1) % imgmw.flow.SYNC_EVERY == 0``).
    ``policy``: the warm starts' fit keeping (:class:`PatchMW2Loss`); ``diagnose``: compute the result's per-scale
    :meth:`PatchMW2Loss.refit_mw2`.

    A grey exemplar (three equal channels) is synthesised as a grey image: one channel is optimised and
    repeated. Optimising three channels would add colour noise — Adam normalises every coordinate by its
    own gradient scale, so the tiny off-grey gradient components get full-size steps (measured on
    ``data/brick.png`` at 256×256: channels differing by 3.9 levels on average, up to 73).

    The Adam default was measured on ``data/wood.png`` (128×128 output, 200 steps, patch sliced-W2 to
    the exemplar; the noise start scores 0.0177): constant lr 0.01 gives 0.0084 after 100 steps, a
    linear decay from 0.02 / 0.03 / 0.04 / 0.05 gives 0.0060 / 0.0055 / 0.0054 / 0.0062 after 200; a
    constant 0.02 turns the pixels noisy (the finest scale's loss rises).
    """
    images, lam = _exemplar_list(exemplar, mix)
    height, width = _check_size(size)
    if not isinstance(stages, int) or stages < 1:
        raise ValueError(f"stages must be an integer >= 1, got {stages!r}")
    if targets is not None and stages > 1:
        raise ValueError("given targets have one pyramid; use stages=1 with them")
    check_positive_int("n_iter", n_iter)
    for name, value in (("refine_n_iter", refine_n_iter), ("finish_n_iter", finish_n_iter)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    check_weight("finish_colour_weight", finish_colour_weight)
    common: dict[str, Any] = dict(patch=patch, n_components=n_components, n_patches=n_patches, lr=lr,
                  optimizer=optimizer, periodic=periodic, mix=lam, fixed_weights=fixed_weights, policy=policy,
                  generator=generator, targets=targets)
    pyramids = [gaussian_pyramid(img, stages) for img in images]
    steps = _stage_steps(n_iter, stages)
    result: SynthesisResult | None = None
    seconds, setup = 0.0, 0.0
    for stage in range(stages):
        factor = 2 ** (stages - 1 - stage)
        shape = (max(1, height // factor), max(1, width // factor))
        start = init if result is None else resize_image(result.image, shape, periodic)
        if stage == 0 and init is not None and factor > 1:
            start = resize_image(_as_image(init, "init")[0], shape, periodic)
        hook = None if callback is None else (
            lambda step, per_scale, image, offset=sum(steps[:stage]): callback(offset + step, per_scale, image))
        result = _synthesize_once([p[stages - 1 - stage] for p in pyramids], shape, init=start, n_iter=steps[stage],
                                  n_scales=n_scales if factor == 1 else None,
                                  diagnose=diagnose and factor == 1, callback=hook, **common)
        seconds, setup = seconds + result.seconds, setup + result.setup_seconds
    assert result is not None  # stages >= 1
    result.seconds, result.setup_seconds = seconds, setup
    result.unrefined = result.image
    used = [img[0] for img, weight in zip(images, lam) if weight > 0]
    large = len(used) == 1 and min(*used[0].shape[-2:], height, width) >= REFINE_PATCH
    finish = bool(finish_n_iter) and targets is None and len(used) == 1 and _finish_fits(used[0], (height, width))
    if refine_n_iter and targets is None and large:
        t_refine = time.perf_counter()
        refined = refine_texture(result.image, used[0], n_iter=refine_n_iter, periodic=periodic, generator=generator)
        if finish or _keeps_patch_statistics(refined, result.image, used[0]):
            result.image, result.refined = refined, True
        result.refine_seconds = time.perf_counter() - t_refine
    if finish:
        offset = sum(steps)
        done = semidual_finish(result.image, used[0], n_iter=finish_n_iter, lr=FINISH_LR, schedule="linear",
                               psi_steps=FINISH_PSI_STEPS, psi_warmup=FINISH_WARMUP,
                               n_scales=_finish_scales(used[0], (height, width)), periodic=periodic,
                               colour_weight=finish_colour_weight, generator=generator,
                               callback=None if callback is None else (
                                   lambda step, per_scale, image: callback(offset + step, per_scale, image)))
        result.image, result.finished = done.image, True
        result.finish_seconds, result.finish_losses = done.seconds, done.losses
        if despeckle:
            t_despeckle = time.perf_counter()
            result.image, result.speckles = remove_speckles(result.image, used[0], periodic=periodic,
                                                            generator=generator)
            result.finish_seconds += time.perf_counter() - t_despeckle
    return result


def _finish_scales(exemplar: Tensor, size: tuple[int, int]) -> int:
    """Pyramid levels of the semi-dual finish: :data:`imgmw.texture_semidual.SCALES`, fewer when the exemplar or
    the output would get a level with a side below :data:`MIN_COARSE_SIDE`."""
    min_side = max(MIN_COARSE_SIDE, SEMIDUAL_PATCH)
    return min(SEMIDUAL_SCALES, n_scales_for(*_hw(exemplar), min_side), n_scales_for(*size, min_side))


def _finish_fits(exemplar: Tensor, size: tuple[int, int]) -> bool:
    """Whether the exemplar and the output are large enough for the finish's patches (sides >= 2·4 px)."""
    return min(*_hw(exemplar), *size) >= 2 * SEMIDUAL_PATCH


def _keeps_patch_statistics(refined: Tensor, image: Tensor, exemplar: Tensor) -> bool:
    """Whether the projection ``refined [3, H, W]`` of ``image`` is at least as close to ``exemplar`` in 4×4 patch
    sliced-W2 (:func:`imgmw.metrics.patch_sliced_w2`, fixed seed) as ``image``: the projection's failure mode
    is a wash-out to the exemplar's commonest low-contrast patches (stochastic textures, sparse bright details),
    which the structure distance rewards but which loses contrast, and that this measure sees."""
    return patch_sliced_w2(refined, exemplar) <= REFINE_KEEP * patch_sliced_w2(image, exemplar)


def _stage_steps(n_iter: int, stages: int) -> list[int]:
    """``n_iter`` split over the stages, coarsest first: ``COARSE_SHARE`` to the coarsest stage, the rest in equal
    parts (at least one step each)."""
    if stages == 1:
        return [n_iter]
    first = max(1, round(COARSE_SHARE * n_iter))
    rest = [max(1, (n_iter - first) // (stages - 1))] * (stages - 1)
    rest[-1] += max(0, n_iter - first - sum(rest))
    return [first, *rest]


def _synthesize_once(images: list[Tensor], size: tuple[int, int], *, patch: int, n_components: int,
                     n_scales: int | None, n_patches: int, n_iter: int, lr: float | None, optimizer: str,
                     periodic: bool, mix: list[float], fixed_weights: bool, policy: FitPolicy | None,
                     diagnose: bool, generator: torch.Generator | None,
                     callback: Callable[[int, Tensor, Tensor], None] | None, init: Tensor | None,
                     targets: Sequence[GMM] | None) -> SynthesisResult:
    """One synthesis at one size (the body of :func:`synthesize_texture`)."""
    images, lam = _exemplar_list(images, mix)
    u = images[max(range(len(lam)), key=lam.__getitem__)]  # the noise start: the heaviest exemplar's field
    height, width = _check_size(size)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    check_positive_int("n_iter", n_iter)
    lr = (ADAM_LR if optimizer == "adam" else 1.0) if lr is None else lr
    if not (isinstance(lr, (int, float)) and 0 < lr < math.inf):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if targets is not None:
        n_scales, n_components = len(targets), targets[0].n_components
    n_scales = texture_n_scales(_common_size(images), (height, width), patch, n_scales)
    check_positive_int("n_components", n_components)
    check_positive_int("n_patches", n_patches)
    for img in images:
        check_patch_counts(_hw(img), (height, width), patch, n_scales, n_components, n_patches,
                           periodic)
    start = time.perf_counter()
    loss_fn = PatchMW2Loss(images, patch, n_components, n_scales, n_patches, periodic, generator, mix=lam,
                           fixed_weights=fixed_weights, policy=policy, targets=targets)
    if init is None:
        init = gaussian_random_field(u, (height, width), periodic=periodic, generator=generator).clamp(0, 1)
    else:
        init = _as_image(init, "init")[0].detach().to(u).clamp(0, 1)
        if tuple(init.shape[-2:]) != (height, width):
            raise ValueError(f"init must be an image of the output size {height}x{width}, got "
                             f"{tuple(init.shape[-2:])}")
    grey = all(is_grey(img) for img in images)
    x0 = (init[:1] if grey else init).unsqueeze(0)   # [1, 1 or 3, H, W]
    setup = time.perf_counter() - start
    drawn = [-1]

    def objective(x: Tensor, step: int) -> Tensor:  # one patch draw per step, shared by L-BFGS's evaluations
        terms = loss_fn.per_scale(_rgb(x), resample=step != drawn[0])
        drawn[0] = step
        return terms

    hook = None if callback is None else (lambda step, _, x: callback(step, cast(Tensor, loss_fn.last_per_scale),
                                                                         _rgb(x)))
    flow = run_flow(x0, objective, n_iter=n_iter, lr=lr, step=optimizer,
                    schedule="linear" if optimizer == "adam" else "constant",
                    project=lambda x: x.clamp_(0.0, 1.0), callback=hook)
    image = _rgb(flow.x)
    refit = loss_fn.refit_mw2(image) if diagnose else None
    assert flow.terms is not None  # n_iter >= 1
    return SynthesisResult(image[0].contiguous(), init, flow.terms.to(torch.float64).cpu(), flow.seconds, setup,
                           n_scales, refit, loss_fn.fit_diagnostics)


def _hw(image: Tensor) -> tuple[int, int]:
    """``(H, W)`` of an image ``[..., H, W]``."""
    return image.shape[-2], image.shape[-1]


def _rgb(x: Tensor) -> Tensor:
    """``[B, 1, H, W]`` grey pixels repeated to ``[B, 3, H, W]`` (a view); RGB input unchanged."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def texture_scores(image: Tensor, exemplar: Tensor, *, init: Tensor | None = None, unrefined: Tensor | None = None,
                   patch: int = 4) -> dict:
    """Quality of a synthesis ``image [3, H, W]`` against ``exemplar [3, h, w]``, as the texture app's
    ``metrics.json`` records it (:mod:`imgmw.metrics`): ``patch × patch`` multi-scale patch sliced-W2, the
    structure distance and the near-copy fraction (15×15 patches), each under ``"result"``, and under ``"init"``
    and ``"mw2_only"`` for the noise start ``init`` and the synthesis before its patch projection ``unrefined``
    (both ``[3, H, W]``) when given."""
    images = {key: img for key, img in (("init", init), ("mw2_only", unrefined), ("result", image)) if img is not None}

    def score(fn) -> dict:
        return {key: fn(img, exemplar) for key, img in images.items()}

    return {"patch_sliced_w2": {"patch": patch, **score(lambda a, b: patch_sliced_w2(a, b, patch=patch))},
            "structure_distance": {"patch": STRUCTURE_PATCH, **score(structure_distance)},
            "near_copy_fraction": {"patch": STRUCTURE_PATCH, "distance_over_contrast_below": COPY_RATIO,
                                   **score(near_copy_fraction)}}
