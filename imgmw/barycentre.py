"""Mixture-Wasserstein barycentres by a flow of points (the paper's barycentre experiment), and palettes.

Given target mixtures ``ν_1..ν_M`` and weights ``λ`` (``λ_i ≥ 0``, ``Σ λ_i = 1``), the barycentre flow moves
points ``X ∈ R^{N×D}`` to minimise

    E(X) = Σ_i λ_i MW2²(EM_K(X), ν_i),

where ``EM_K(X)`` is the warm-started ``K``-component EM fit of ``X`` (one differentiable EM step per
iteration from the previous iteration's repaired, detached parameters: the paper's Algorithm 3 with the
fit-keeping policy, :class:`imgmw.WarmStartEM`). ``X`` starts as seeded standard normal noise. Each
iteration is one explicit Euler step of the Wasserstein gradient flow of ``E`` on the empirical measure
``(1/N) Σ δ_{x_i}`` (:func:`imgmw.flow.run_flow`): ``x_i ← x_i − lr · N ∇_{x_i} E`` (each point moves at the
speed of the flow's velocity field, whatever ``N``). At convergence ``EM_K(X)`` is a ``K``-component MW2
barycentre of the targets, the same object :func:`imgmw.gmm_barycentre` computes by a fixed point on the mixture
parameters.

Colour palettes: the targets are the colour GMMs of several images (:func:`colour_targets`), the
barycentre's points are colours, :func:`palette_image` lays them out as a swatch, and
:func:`recolour_to_gmm` recolours an image to a mixture with the colour-transfer flow of
:mod:`imgmw.colour`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .colour import apply_palette_lut, build_palette, colour_flow, fit_colour_gmm, from_scaled_space, to_scaled_space
from .deprecation import renamed_parameters
from .flow import refit_mw2, run_flow
from .gmm import GMM
from .losses import relative_reg_covar
from .ot import barycentre_weights, check_gmm, gmm_barycentre, mw2
from .warm import WarmStartEM

__all__ = ["INITS", "stack_targets", "barycentre_objective", "barycentre_flow", "barycentre_report", "demo_targets",
           "colour_targets", "palette_image", "recolour_to_gmm"]

INITS = ("normal", "moments")


# --------------------------------------------------------------------------------------------- targets
def stack_targets(targets: Sequence[GMM]) -> GMM:
    """Stack ``M`` target mixtures (equal ``K``, ``D``, batch ``*B``, dtype, device) into one GMM ``[M, *B]``."""
    targets = [] if isinstance(targets, GMM) else list(targets)
    if not targets or not all(isinstance(g, GMM) for g in targets):
        raise ValueError("targets must be a non-empty list of imgmw.GMM")
    for i, g in enumerate(targets):
        check_gmm(g.detach(), f"targets[{i}]")
    first = targets[0]
    for i, g in enumerate(targets[1:], 1):
        if (g.n_components, g.n_features, g.batch_shape) != (first.n_components, first.n_features, first.batch_shape):
            raise ValueError(f"targets[{i}] has (K, D, *B) = {(g.n_components, g.n_features, tuple(g.batch_shape))}, "
                             f"targets[0] has {(first.n_components, first.n_features, tuple(first.batch_shape))}; "
                             "fit all targets with the same K and D")
        if g.dtype != first.dtype or g.device != first.device:
            raise ValueError(f"targets[{i}] ({g.dtype}, {g.device}) must share dtype and device with targets[0] "
                             f"({first.dtype}, {first.device})")
    return GMM.stack([g.detach() for g in targets], 0)


def barycentre_objective(fit: GMM, stacked: GMM, lam: Tensor) -> tuple[Tensor, Tensor]:
    """``(E [*B], per-target MW2² [M, *B])`` with ``E = Σ_i λ_i MW2²(fit, ν_i)``.

    ``fit``: batch ``*B``; ``stacked``: the targets stacked to ``[M, *B]`` (:func:`stack_targets`); ``lam [M]``.
    One batched :func:`imgmw.mw2` call; differentiable in ``fit``.
    """
    per_target = mw2(fit, stacked)  # fit [*B] broadcasts against [M, *B]
    weighted = lam.view(-1, *[1] * (per_target.dim() - 1)) * per_target
    return weighted.sum(0), per_target


# --------------------------------------------------------------------------------------------- the flow
def _initial_points(how: str, n_points: int, stacked: GMM, lam: Tensor, generator: torch.Generator | None) -> Tensor:
    """Noise ``[*B, N, D]`` on the targets' device and dtype, drawn with ``generator``.

    ``"normal"``: standard normal (the paper's start). ``"moments"``: normal with the mean ``m̄`` and
    covariance ``Σ̄`` of the mixture ``Σ_i λ_i ν_i``, i.e. ``m̄ = Σ_ik λ_i w_ik m_ik`` and
    ``Σ̄ = Σ_ik λ_i w_ik (Σ_ik + (m_ik − m̄)(m_ik − m̄)ᵀ)``: the points start at the targets' location and
    scale, which shortens the flow when the targets are far from the origin or narrow (colours).
    """
    if how not in INITS:
        raise ValueError(f"init must be a tensor of points or one of {INITS}, got {how!r}")
    shape = (*stacked.batch_shape[1:], n_points, stacked.n_features)
    device = generator.device if generator is not None else stacked.device
    z = torch.randn(shape, generator=generator, device=device, dtype=stacked.dtype).to(stacked.device)
    if how == "normal":
        return z
    mass = lam.view(-1, *[1] * (stacked.weights.dim() - 1)) * stacked.weights  # λ_i w_ik, [M, *B, K]
    mean = (mass.unsqueeze(-1) * stacked.means).sum((0, -2))  # [*B, D]
    centred = stacked.means - mean.unsqueeze(-2)
    cov = (mass[..., None, None] * (stacked.covariances + centred.unsqueeze(-1) * centred.unsqueeze(-2))).sum((0, -3))
    return mean.unsqueeze(-2) + z @ torch.linalg.cholesky(cov).mT


@renamed_parameters(k="n_components", iters="n_iter")
def barycentre_flow(targets: Sequence[GMM], weights: Sequence[float] | Tensor | None = None, n_points: int = 500,
                    *, n_components: int | None = None, n_iter: int = 300, lr: float = 0.1,
                    reg_covar: float | None = None,
                    init: Tensor | str = "normal", generator: torch.Generator | None = None,
                    em: WarmStartEM | None = None,
                    callback: Callable[[int, Tensor, Tensor], None] | None = None) -> tuple[Tensor, list[float]]:
    """Minimise ``E(X) = Σ_i λ_i MW2²(EM_K(X), ν_i)`` over points ``X [*B, N, D]`` (see the module docstring).

    Args:
        targets: ``M`` mixtures ``ν_i`` with equal ``K_ν``, ``D`` and batch ``*B`` (several independent
            barycentre problems at once when ``*B`` is non-empty).
        weights: ``λ [M]``, ``≥ 0``, summing to one (default uniform).
        n_points: ``N``, the number of points (ignored when ``init`` is given).
        n_components: ``K``, components of the EM fit of ``X`` (default: the targets' ``K_ν``, the paper's
            advice).
        n_iter: flow steps; lr: Euler step ``τ`` of ``x_i ← x_i − τ N ∇_{x_i} E``.
        reg_covar: ``ε_r`` of the EM fits (default ``1e-4 ×`` the targets' largest covariance eigenvalue).
        init: starting points ``[*B, N, D]``, or noise drawn with ``generator``: ``"normal"`` (standard
            normal, the paper's choice) or ``"moments"`` (normal with the mean and covariance of
            ``Σ_i λ_i ν_i``).
        generator: seeds the initial noise and the k-means++ start of the first EM fit.
        em: the warm-started EM to use (default: a new :class:`imgmw.WarmStartEM` with ``K`` components, fixed uniform
            weights — the barycentre :func:`imgmw.gmm_barycentre` computes has them —, ``reg_covar`` and
            ``generator``); pass one to read the final fit of ``X`` from its ``state`` afterwards.
        callback: ``callback(i, E, X)`` after every step (``E`` summed over ``*B``, a 0-d device tensor to read at
            :func:`imgmw.flow.run_flow`'s sync points; ``X`` detached).

    Returns:
        ``(X [*B, N, D], history)``: the final points and ``E`` (summed over ``*B``) before every step.

    Raises:
        ValueError: bad targets or weights, ``N < K``.
        imgmw.flow.FlowDivergence: non-finite or exploding objective (lower ``lr``).
    """
    stacked = stack_targets(targets)
    lam = barycentre_weights(weights, stacked.batch_shape[0], stacked.means)
    k = stacked.n_components if n_components is None else n_components
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"n_components must be an integer >= 1, got {k!r}")
    if not (isinstance(n_iter, int) and n_iter >= 0) or not (0 < lr < math.inf):
        raise ValueError(f"n_iter must be an integer >= 0 and lr a finite number > 0, got n_iter={n_iter!r}, "
                         f"lr={lr!r}")
    x = (_initial_points(init, n_points, stacked, lam, generator) if isinstance(init, str)
         else init.detach().to(stacked.means))
    if x.shape[:-2] != stacked.batch_shape[1:] or x.shape[-1] != stacked.n_features or x.shape[-2] < k:
        want = ", ".join([*map(str, stacked.batch_shape[1:]), f"N >= {k}", str(stacked.n_features)])
        raise ValueError(f"points must be [*B, N, D] = [{want}] (the targets' batch and dimension, at least "
                         f"n_components points), got {tuple(x.shape)} (n_points={n_points})")
    reg = relative_reg_covar(stacked) if reg_covar is None else reg_covar
    if em is None:
        em = WarmStartEM(k, fixed_weights=True, reg_covar=reg, n_init_iter=30, generator=generator)

    def objective(points: Tensor, _: int) -> Tensor:
        return barycentre_objective(em(points), stacked, lam)[0]

    flow = run_flow(x, objective, n_iter=n_iter, lr=lr * x.shape[-2], callback=callback)
    return flow.x, flow.losses


def barycentre_report(points: Tensor, fit: GMM, targets: Sequence[GMM], weights: Sequence[float] | Tensor | None = None,
                      *, n_components: int | None = None, reg_covar: float | None = None,
                      generator: torch.Generator | None = None) -> dict[str, float | list]:
    """How good a flow's barycentre is, as JSON-able numbers (no gradient).

    ``points [*B, N, D]`` and ``fit`` (its warm-started fit, e.g. ``em.state``) come from
    :func:`barycentre_flow` on ``targets`` with ``weights``. Returns ``final_objective`` ``E`` of ``fit``,
    ``per_target_mw2`` (``MW2²(fit, ν_i)``), ``refit_mw2`` (``E`` of a fresh fit of the points,
    :func:`imgmw.flow.refit_mw2`: the loss still describes its points when it is close to ``final_objective``),
    ``fixed_point_objective`` (``E`` of :func:`imgmw.gmm_barycentre`'s fixed point) and
    ``mw2_flow_fit_to_fixed_point`` (``MW2²`` between the two barycentres); values summed over ``*B``.
    """
    stacked = stack_targets(targets)
    lam = barycentre_weights(weights, stacked.batch_shape[0], stacked.means)
    reg = relative_reg_covar(stacked) if reg_covar is None else reg_covar
    k = stacked.n_components if n_components is None else n_components
    with torch.no_grad():
        final, per_target = barycentre_objective(fit, stacked, lam)
        fixed_point = gmm_barycentre(list(targets), lam)
        refit = refit_mw2(points, stacked, n_components=k, fixed_weights=True, reg_covar=reg, generator=generator)
        return {"final_objective": float(final.sum()), "per_target_mw2": per_target.tolist(),
                "refit_mw2": float((lam.view(-1, *[1] * (refit.dim() - 1)) * refit).sum()),
                "fixed_point_objective": float(barycentre_objective(fixed_point, stacked, lam)[0].sum()),
                "mw2_flow_fit_to_fixed_point": float(mw2(fit, fixed_point).sum())}


def demo_targets(dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> list[GMM]:
    """Three 2-component 2-D mixtures (weights ``½, ½``) for the paper's 2-D barycentre experiment.

    Centred at the vertices of a triangle of radius 4 around the origin; mixture ``i`` has its two
    components at ``±s_i (cos a_i, sin a_i)`` from its centre (``s = 1.5, 1, 2``; ``a = 0°, 50°, 100°``) and
    anisotropic covariances of different orientations, so the barycentre is unique (no symmetry).
    """
    def tensor(values: list) -> Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    centres = 4.0 * tensor([[0.0, 1.0], [-0.866, -0.5], [0.866, -0.5]])
    angles = tensor([0.0, 50.0, 100.0]).deg2rad()
    offsets = tensor([1.5, 1.0, 2.0])[:, None] * torch.stack([angles.cos(), angles.sin()], -1)
    means = centres[:, None, :] + torch.stack([offsets, -offsets], 1)  # [3, 2, 2]
    rot = torch.stack([torch.stack([angles.cos(), -angles.sin()], -1),
                       torch.stack([angles.sin(), angles.cos()], -1)], -2)  # [3, 2, 2]
    variances = tensor([[0.4, 0.05], [0.1, 0.3]])  # per component, along the rotated axes
    covs = rot[:, None] @ torch.diag_embed(variances)[None] @ rot[:, None].mT  # [3, 2, 2, 2]
    weights = tensor([0.5, 0.5])
    return [GMM(weights, means[i], covs[i]) for i in range(3)]

# --------------------------------------------------------------------------------------------- palettes
@renamed_parameters(k="n_components")
def colour_targets(images: Sequence[Tensor], n_components: int = 10, *, colorspace: str = "lab", max_colors: int = 8192,
                   generator: torch.Generator | None = None) -> list[GMM]:
    """The ``n_components``-component colour GMM (fixed uniform weights, pixel-count weighted EM) of each image
    ``[3, H, W]``.

    Colours live in ``colorspace`` scaled to O(1) (:func:`imgmw.colour.to_scaled_space`); see
    :func:`imgmw.colour.fit_colour_gmm`.
    """
    return [fit_colour_gmm(build_palette(img, max_colors), colorspace, n_components, generator=generator)
            for img in images]


def palette_image(colours: Tensor, columns: int = 25, cell: int = 12) -> Tensor:
    """A swatch ``[3, rows·cell, columns·cell]`` of sRGB ``colours [N, 3]``, sorted by luminance, one cell each.

    Colours are sorted by Rec. 709 luma ``0.2126 R + 0.7152 G + 0.0722 B`` (rows dark to light); the unused
    cells of the last row are white.
    """
    if colours.dim() != 2 or colours.shape[-1] != 3 or colours.shape[0] < 1:
        raise ValueError(f"colours must be [N, 3] with N >= 1, got {tuple(colours.shape)}")
    luma = colours @ torch.tensor([0.2126, 0.7152, 0.0722], dtype=colours.dtype, device=colours.device)
    ordered = colours[luma.argsort()].clamp(0, 1)
    rows = -(-ordered.shape[0] // columns)
    grid = torch.ones(rows * columns, 3, dtype=colours.dtype, device=colours.device)
    grid[: ordered.shape[0]] = ordered
    grid = grid.view(rows, columns, 3).permute(2, 0, 1)  # [3, rows, columns]
    return grid.repeat_interleave(cell, 1).repeat_interleave(cell, 2)


@renamed_parameters(iters="n_iter")
def recolour_to_gmm(image: Tensor, target: GMM, *, colorspace: str = "lab", n_iter: int = 100, lr: float = 0.2,
                    max_colors: int = 8192, generator: torch.Generator | None = None) -> tuple[Tensor, list[float]]:
    """Recolour ``image [3, H, W]`` towards the colour mixture ``target`` (in scaled ``colorspace``).

    The colour-transfer flow of :mod:`imgmw.colour` with a given target mixture: the image's palette
    (:func:`imgmw.colour.build_palette`) flows by :func:`imgmw.colour.colour_flow` and every pixel follows
    through the 3-D lookup table :func:`imgmw.colour.apply_palette_lut`. Returns ``(image, loss history)``.
    """
    palette = build_palette(image, max_colors)
    if palette.colours.shape[0] < target.n_components:
        raise ValueError(f"the image to recolour has only {palette.colours.shape[0]} distinct colours, fewer than "
                         f"the {target.n_components} components of the palette mixture")
    moved, flow, _ = colour_flow(to_scaled_space(palette.colours, colorspace), palette.counts, target, n_iter=n_iter,
                                 lr=lr, generator=generator)
    return apply_palette_lut(image, palette, from_scaled_space(moved, colorspace)), flow.losses
