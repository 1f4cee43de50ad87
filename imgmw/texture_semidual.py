"""Multi-scale patch semi-dual optimal transport (Houdard, Leclaire, Papadakis & Rabin) for texture synthesis.

At pyramid level ``s`` the target is a discrete set ``Y_s = {y_1, …, y_J} ⊂ R^D`` of ``J`` random ``p×p``
exemplar patches (``D = 3p²``; all of them on levels with fewer) and the synthesis ``x`` is compared to the
uniform measure on ``Y_s`` by the semi-dual formulation of optimal transport with a dual vector ``ψ ∈ R^J``:

    H_s(ψ, X) = (1/n) Σ_i min_j (‖x_i − y_j‖² − ψ_j) + (1/J) Σ_j ψ_j,     OT(X, Y_s) = max_ψ H_s(ψ, X),

over the ``n`` patches ``x_i`` of level ``s`` of ``x``. ``H`` is concave in ``ψ``; its supergradient is
``∂H/∂ψ_j = 1/J − (fraction of the x_i whose argmin is j)``, so ascent raises ``ψ_j`` of the exemplar patches
that are used less than ``1/J`` and lowers the over-used ones: at the maximum every target patch receives the
same share of synthesis patches (no wash-out to a few flat patches, no copying of a few patches). For fixed
``ψ`` the image step minimises ``Σ_s H_s(ψ_s, X_s)`` over the pixels: every synthesis patch is pulled towards
its ψ-shifted nearest exemplar patch ``y_σ(i)``; by the envelope theorem the gradient is
``2 (x_i − y_σ(i))`` and the argmin is computed without gradient (chunked ``n × J`` distances).

One iteration (:meth:`SemiDualPatchOT.ascend_psi`, then :meth:`SemiDualPatchOT.image_loss` and an optimiser
step): per scale ``psi_steps`` stochastic ascent steps on ``ψ_s`` (minibatches of ``psi_batch`` random
synthesis patches, step ``psi_lr``), the image step using the average ``ψ̄_s`` of the iteration's iterates
(a Polyak average over the whole run lags behind the moving image), then one Adam step on the pixels of the
loss over ``image_patches`` random patches per scale.

* :class:`SemiDualPatchOT` — the state: targets ``Y_s``, duals ``ψ_s`` and their averages.
* :func:`semidual_cost` — ``H_s(ψ_s, X_s)`` on all patches of an image (a measurement, no gradient).
* :func:`semidual_finish` — a short semi-dual phase on the pixels of a given image (e.g. an MW2 synthesis):
  what :func:`imgmw.texture.synthesize_texture` runs after its MW2 flow, optionally with the sliced colour W2²
  of :mod:`imgmw.colour_loss` added to the image step (``colour_weight``).

``benchmarks/bench_texture.py``'s baseline is this class with the defaults (500 iterations from noise).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .colour_loss import SlicedColourLoss
from .distributed import all_reduce_sum, check_process_group
from .image import is_grey
from .patches import coverage_scaled, extract_patches, gaussian_pyramid, patch_grid, random_patches
from .validation import check_positive_int, check_weight, single_image

__all__ = ["SemiDualPatchOT", "semidual_cost", "semidual_finish", "FinishResult", "TARGET_PATCHES", "PSI_STEPS",
           "PSI_BATCH", "PSI_LR", "IMAGE_PATCHES", "IMAGE_LR", "SCALES", "PATCH", "COLOUR_PIXELS"]

TARGET_PATCHES = 2000       # exemplar patches per scale (the discrete target Y_s)
PSI_STEPS = 10              # averaged-SGD ascent steps on ψ_s per scale per iteration
PSI_BATCH = 1000            # synthesis patches per ψ step
PSI_LR = 1.0                # ascent step on ψ
IMAGE_PATCHES = 4096        # synthesis patches per scale in the image step
IMAGE_LR = 0.01             # Adam step on the image (the baseline's)
SCALES = 4                  # pyramid levels of the baseline
PATCH = 4                   # patch side
CHUNK = 2048                # rows of the n × J distance matrix computed at once
COLOUR_PIXELS = 65536       # pixels of the finish's colour term per step (all of them in images up to 256²)


class SemiDualPatchOT:
    """Per-scale targets ``Y_s [J_s, D_s]``, duals ``ψ_s [J_s]`` and their iteration averages ``ψ̄_s``.

    Args:
        exemplar: ``[3, h, w]`` (or ``[1, 3, h, w]``) image.
        generator: ``torch.Generator`` of every random draw (targets, minibatches).
        n_scales: pyramid levels ``S`` (:func:`imgmw.patches.gaussian_pyramid`).
        patch: patch side ``p``, one for all levels or one per level (finest first).
        n_targets: ``J``: exemplar patches per level (all of them if fewer).
        psi_steps, psi_batch, psi_lr: the ascent on ``ψ`` (see the module docstring).
        image_patches: synthesis patches per level in :meth:`image_loss`.
        periodic: the synthesis's patches wrap around (a tileable output); the exemplar's never do.
        process_group: ranks whose syntheses share the duals: every ψ ascent step counts the assignments of all
            ranks' patches (one all-reduce per level and step), so all ranks hold the same ``ψ_s`` (their targets
            must be the same: the same exemplar and generator seed on every rank).

    The draws are made in the order of the original benchmark (targets finest first, then per ascent step the
    levels in order), so a seed gives the same run.
    """

    def __init__(self, exemplar: Tensor, generator: torch.Generator | None = None, *, n_scales: int = SCALES,
                 patch: int | Sequence[int] = PATCH, n_targets: int = TARGET_PATCHES, psi_steps: int = PSI_STEPS,
                 psi_batch: int = PSI_BATCH, psi_lr: float = PSI_LR, image_patches: int = IMAGE_PATCHES,
                 periodic: bool = False, process_group=None) -> None:
        u = single_image(exemplar, "exemplar").detach()
        self.process_group = check_process_group(process_group)
        for name, value in (("n_scales", n_scales), ("n_targets", n_targets), ("psi_steps", psi_steps),
                            ("psi_batch", psi_batch), ("image_patches", image_patches)):
            check_positive_int(name, value)
        if not (isinstance(psi_lr, (int, float)) and 0 < psi_lr < math.inf):
            raise ValueError(f"psi_lr must be a finite number > 0, got {psi_lr!r}")
        self.patches = [patch] * n_scales if isinstance(patch, int) else [int(p) for p in patch]
        if len(self.patches) != n_scales:
            raise ValueError(f"patch must be an int or {n_scales} ints (one per scale), got {patch!r}")
        for p in self.patches:
            check_positive_int("patch", p)
        self.generator, self.periodic = generator, periodic
        self.n_scales, self.psi_steps, self.psi_batch, self.psi_lr = n_scales, psi_steps, psi_batch, float(psi_lr)
        self.image_patches = image_patches
        levels = gaussian_pyramid(u, n_scales)
        for level, p in zip(levels, self.patches):
            if min(level.shape[-2:]) < p:
                raise ValueError(f"the exemplar ({u.shape[-2]}x{u.shape[-1]}) is too small for {p}x{p} patches at "
                                 f"{n_scales} scales; use fewer scales or smaller patches")
        self.targets = [self._patches(lv, p, n_targets, periodic=False) for lv, p in zip(levels, self.patches)]
        self.sq_norms = [(y * y).sum(1) for y in self.targets]
        self.psi = [torch.zeros(y.shape[0], dtype=u.dtype, device=u.device) for y in self.targets]
        self.psi_avg = [p.clone() for p in self.psi]

    def _patches(self, level: Tensor, p: int, n: int, *, periodic: bool | None = None) -> Tensor:
        """``min(n, all)`` distinct random ``p×p`` patches of ``level [1, 3, h, w]``: ``[n', 3p²]``."""
        wrap = self.periodic if periodic is None else periodic
        rows, cols = patch_grid(level.shape[-2], level.shape[-1], p, wrap)
        return random_patches(level, p, min(n, rows * cols), self.generator, wrap)[0]

    def assign(self, s: int, x: Tensor, psi: Tensor | None = None) -> Tensor:
        """``σ(i) = argmin_j ‖x_i − y_j‖² − ψ_j`` for ``x [n, D]`` at level ``s`` (chunked, no gradient): ``[n]``."""
        y, yy = self.targets[s], self.sq_norms[s]
        psi = self.psi[s] if psi is None else psi
        with torch.no_grad():
            return torch.cat([(yy - psi - 2 * xc @ y.T).argmin(1) for xc in x.detach().split(CHUNK)])

    def ascend_psi(self, levels: Sequence[Tensor], n_steps: int | None = None) -> None:
        """``n_steps`` (default ``psi_steps``) averaged-SGD ascent steps on every ``ψ_s``, the image levels
        ``[1, 3, h_s, w_s]`` held fixed (each rank's own under a process group, the counts summed over the
        ranks); ``ψ̄_s`` becomes the average of these iterates."""
        n_steps = self.psi_steps if n_steps is None else n_steps
        check_positive_int("n_steps", n_steps)
        self.psi_avg = [torch.zeros_like(p) for p in self.psi]
        with torch.no_grad():
            for _ in range(n_steps):
                for s, level in enumerate(levels):
                    idx = self.assign(s, self._patches(level.detach(), self.patches[s], self.psi_batch))
                    n_targets = self.psi[s].numel()
                    counts = all_reduce_sum(torch.bincount(idx, minlength=n_targets).to(self.psi[s]),
                                            self.process_group)
                    share = counts / counts.sum()
                    self.psi[s] += self.psi_lr * (1.0 / n_targets - share)
                    self.psi_avg[s] += self.psi[s] / n_steps

    def per_scale(self, levels: Sequence[Tensor]) -> Tensor:
        """``[H_s(ψ̄_s, X_s)]_s`` on ``image_patches`` random patches per level, differentiable in them: ``[S]``."""
        terms = []
        for s, level in enumerate(levels):
            x = self._patches(level, self.patches[s], self.image_patches)
            idx = self.assign(s, x, self.psi_avg[s])
            cost = (x - self.targets[s][idx]).square().sum(1) - self.psi_avg[s][idx]
            terms.append(cost.mean() + self.psi_avg[s].mean())
        return torch.stack(terms)

    def image_loss(self, levels: Sequence[Tensor]) -> Tensor:
        """``Σ_s H_s(ψ̄_s, X_s)`` (see :meth:`per_scale`): a 0-d tensor."""
        return self.per_scale(levels).sum()

    def loss(self, images: Tensor) -> Tensor:
        """The semi-dual patch OT of generated ``images [b, 3, H, W]`` as one loss: for each sample in turn,
        :meth:`ascend_psi` on its (detached) pyramid, then :meth:`image_loss` of it; the mean over the ``b``
        samples, differentiable in ``images`` (a 0-d tensor)."""
        terms = []
        for x in images.split(1):
            levels = gaussian_pyramid(x, self.n_scales, self.periodic)
            self.ascend_psi([level.detach() for level in levels])
            terms.append(self.image_loss(levels))
        return torch.stack(terms).mean()


def semidual_cost(ot: SemiDualPatchOT, image: Tensor, psi: Sequence[Tensor] | None = None) -> Tensor:
    """``[H_s(ψ_s, X_s)]_s`` over **all** patches of ``image [3, H, W]`` (no gradient): ``[S]`` float64.

    ``psi`` defaults to ``ot.psi``; with ``ψ = 0`` it is the mean squared distance of every patch to its
    nearest target patch."""
    levels = gaussian_pyramid(single_image(image, "image").detach(), ot.n_scales, ot.periodic)
    out = []
    for s, level in enumerate(levels):
        ps = (ot.psi if psi is None else psi)[s]
        x = extract_patches(level, ot.patches[s], periodic=ot.periodic)[0]
        idx = ot.assign(s, x, ps)
        cost = (x - ot.targets[s][idx]).square().sum(1) - ps[idx]
        out.append(cost.double().mean() + ps.double().mean())
    return torch.stack(out)


def _some_pixels(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """``x [1, C, H, W]`` itself if it has at most :data:`COLOUR_PIXELS` pixels, else that many distinct random
    pixels of it (:func:`imgmw.patches.random_patches` with 1×1 patches) as ``[1, C, 1, COLOUR_PIXELS]``."""
    if x.shape[-2] * x.shape[-1] <= COLOUR_PIXELS:
        return x
    return random_patches(x, 1, COLOUR_PIXELS, generator).mT.unsqueeze(2)


@dataclass
class FinishResult:
    """What :func:`semidual_finish` returns.

    Attributes:
        image: ``[3, H, W]`` the finished image.
        ot: the :class:`SemiDualPatchOT` state at the end (targets, duals).
        losses: ``[n_iter, S]`` the per-scale costs ``H_s(ψ̄_s, X_s)`` of every step (float64, CPU).
        seconds: wall time, target draws included.
    """

    image: Tensor
    ot: SemiDualPatchOT
    losses: Tensor
    seconds: float


def semidual_finish(image: Tensor, exemplar: Tensor, *, n_iter: int, lr: float = IMAGE_LR,
                    schedule: str = "constant", n_scales: int = SCALES, patch: int | Sequence[int] = PATCH,
                    n_targets: int = TARGET_PATCHES, psi_steps: int = PSI_STEPS, psi_warmup: int = 0,
                    psi_batch: int = PSI_BATCH, psi_lr: float = PSI_LR, image_patches: int = IMAGE_PATCHES,
                    periodic: bool = False, colour_weight: float = 0.0, generator: torch.Generator | None = None,
                    callback: Callable[[int, Tensor, Tensor], None] | None = None) -> FinishResult:
    """Minimise ``Σ_s OT_s`` (the semi-dual patch OT of the module docstring) over the pixels of ``image``.

    Starting from ``image [3, H, W]`` (e.g. the MW2 synthesis, whose patch statistics are already right), runs
    ``n_iter`` iterations: ψ ascent (``psi_steps`` averaged-SGD steps per scale), then one Adam step
    (``lr``, ``schedule`` ``"constant"`` or ``"linear"`` decay to 0) on the pixels
    of ``Σ_s H_s(ψ̄_s, X_s)``, pixels clamped to [0, 1]. ``psi_warmup`` extra ascent steps before the first
    iteration let ``ψ`` approach the start's equilibrium (from ``ψ = 0`` the assignment is the plain nearest patch,
    which piles onto a few flat exemplar patches). ``colour_weight`` ``λ > 0`` adds ``λ·L_c(x)`` to the image step,
    ``L_c`` the sliced W2² between the pixel colours and the exemplar's (:class:`imgmw.colour_loss.SlicedColourLoss`,
    16 directions): ψ shares the synthesis patches out evenly over the 2000 target patches, but a short finish
    from a projection (whose patches are the exemplar's commonest, low-contrast ones) leaves too few bright or
    rare colours, which the colour term restores (see :func:`imgmw.texture.synthesize_texture` for the
    measurements). The colour term's gradient is scaled per pixel by the share of level-0 patches that hold the
    pixel (:func:`imgmw.patches.coverage_scaled`; not when ``periodic``): unscaled, it outweighs the patch term at
    the borders, where a pixel lies in few patches, and Adam's per-pixel steps drew a line of off-colour specks
    along the image edges (stripes, hubble at 256²). Images of more than :data:`COLOUR_PIXELS` pixels give the
    term that many distinct random pixels at every step: sorting the projections of all pixels raised the peak
    memory of a 2048² synthesis from 2.2 to 3.4 GB. A grey exemplar (three equal channels) with a grey start
    keeps a grey image (one channel optimised). ``callback(step, per_scale [S], image [1, 3, H, W])`` after each
    step (the step's costs ``H_s``, detached, on the device; the image after the step).

    Returns:
        :class:`FinishResult` (``image [3, H, W]`` in ``image``'s dtype and device).
    """
    check_positive_int("n_iter", n_iter)
    if not isinstance(psi_warmup, int) or isinstance(psi_warmup, bool) or psi_warmup < 0:
        raise ValueError(f"psi_warmup must be an int >= 0, got {psi_warmup!r}")
    if schedule not in ("constant", "linear"):
        raise ValueError(f"schedule must be 'constant' or 'linear', got {schedule!r}")
    if not (isinstance(lr, (int, float)) and 0 < lr < math.inf):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    check_weight("colour_weight", colour_weight)
    x0 = single_image(image, "image").detach().clamp(0, 1)
    u = single_image(exemplar, "exemplar").detach().to(x0)
    start = time.perf_counter()
    ot = SemiDualPatchOT(u, generator, n_scales=n_scales, patch=patch, n_targets=n_targets, psi_steps=psi_steps,
                         psi_batch=psi_batch, psi_lr=psi_lr, image_patches=image_patches, periodic=periodic)
    if psi_warmup:
        ot.ascend_psi(gaussian_pyramid(x0, n_scales, periodic), psi_warmup)
    grey = is_grey(u) and is_grey(x0)
    var0 = x0[:, :1] if grey else x0
    colour = SlicedColourLoss(u[:, :1] if grey else u) if colour_weight else None

    def rgb(x: Tensor) -> Tensor:
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    # Its own Adam loop rather than imgmw.flow.run_flow: H rises while ψ ascends (a max over ψ inside the min over
    # x), which run_flow's divergence rules (a loss growing 10x above its start) would take for a divergence.
    x = var0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    losses = []
    for step in range(n_iter):
        for group in opt.param_groups:
            group["lr"] = lr * (1.0 - step / n_iter if schedule == "linear" else 1.0)
        with torch.no_grad():
            ot.ascend_psi(gaussian_pyramid(rgb(x.detach()), n_scales, periodic))
        terms = ot.per_scale(gaussian_pyramid(rgb(x), n_scales, periodic))
        objective = terms.sum() if colour is None else terms.sum() + colour_weight * colour(_some_pixels(
            coverage_scaled(x, ot.patches[0], periodic), generator))
        opt.zero_grad(set_to_none=True)
        objective.backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
        losses.append(terms.detach())
        if callback is not None:
            callback(step, terms.detach(), rgb(x.detach()))
    history = torch.stack(losses).to(torch.float64).cpu()
    if not bool(torch.isfinite(history).all()) or not bool(torch.isfinite(x).all()):
        raise FloatingPointError(f"the semi-dual finish produced non-finite values; lower lr (lr={lr:g})")
    return FinishResult(rgb(x.detach())[0].contiguous(), ot, history, time.perf_counter() - start)
