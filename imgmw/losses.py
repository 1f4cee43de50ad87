"""Mixture-Wasserstein losses as ``nn.Module``s.

:class:`MW2Loss` compares a set of points ``x [*B, N, D]`` with a fixed target mixture ``ν``:

    L(x) = MW2²(EM_K(x), ν)      (or the unbalanced UMW2² with ``unbalanced=(λx, λν)``),

where ``EM_K(x)`` is a ``K``-component GMM fitted to ``x`` by a differentiable EM, so that
``L.backward()`` moves the points. Defaults: the same ``K`` on both sides, warm-started EM with the fit-keeping policy
(:class:`imgmw.WarmStartEM`: one differentiable EM step per call from the previous call's repaired
parameters, the paper's Algorithm 3 plus :class:`imgmw.warm.FitPolicy`), and **learned** mixture weights on
both sides. The paper fixes uniform weights; measured here that lets a component hold almost no points at
weight ``1/K`` and the loss stop describing the data (colour flows: a fresh fit of the moved colours 25–40×
further from the target than the reported loss, and more components giving worse results); with learned
weights the weights carry the mass, the transport charges for misplaced mass, and the same flows end
with a fresh fit within 2× of the loss (``benchmarks/bench_flow.py``).

One rule sets ``reg_covar`` for a target and for the fits compared with it (:func:`data_reg_covar`):
``ε_r = 1e-4 × λ_max`` of the target data's covariance (the paper's heuristic, taken on the data so that
the target fit itself can use it); a target given as a GMM uses ``1e-4 ×`` its components' largest
eigenvalue (:func:`relative_reg_covar`). Targets given as points are fitted by :func:`fit_target`.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .distributed import check_process_group, check_same_tensor
from .em import fit_gmm
from .gmm import GMM
from .init import data_moments
from .ot import check_unbalanced, check_gmm, mw2
from .validation import check_choice, check_points, point_weights
from .warm import FitPolicy, WarmStartEM

__all__ = ["MW2Loss", "REDUCTIONS", "REG_FACTOR", "relative_reg_covar", "data_reg_covar", "fit_target"]

REDUCTIONS = ("mean", "sum", "none")
REG_FACTOR = 1e-4       # ε_r = REG_FACTOR × λ_max (the paper's heuristic)
TARGET_ITER = 200       # EM steps of a target fit at most ...
TARGET_TOL = 1e-5       # ... stopped when the mean log-likelihood changes by less


def relative_reg_covar(target: GMM, factor: float = REG_FACTOR) -> float:
    """``ε_r = factor × max_k λ_max(Σ_k)`` over all components and batch elements of a target GMM."""
    return factor * float(torch.linalg.eigvalsh(target.covariances.detach()).max())


@torch.no_grad()
def data_reg_covar(points: Tensor, sample_weight: Tensor | None = None, factor: float = REG_FACTOR,
                   process_group=None) -> float:
    """``ε_r = factor × λ_max`` of the (weighted) covariance of ``points [*B, N, D]`` (max over ``*B``; of all
    ranks' points with a ``process_group``), floored at ``factor × eps`` so that a constant set still gets a
    positive regularisation."""
    _, cov = data_moments(points.detach(), None if sample_weight is None else sample_weight.detach(),
                          check_process_group(process_group))
    top = float(torch.linalg.eigvalsh(cov.double()).max())
    return factor * max(top, float(torch.finfo(points.dtype).eps))


@torch.no_grad()
def fit_target(points: Tensor, n_components: int, *, sample_weight: Tensor | None = None,
               fixed_weights: bool = False, reg_covar: float | None = None, n_iter: int = TARGET_ITER,
               generator: torch.Generator | None = None) -> GMM:
    """The target mixture of a set of points ``[*B, N, D]``: the one routine every loss and app uses.

    k-means++ start, at most ``n_iter`` EM steps (stopped when the mean log-likelihood per point changes by
    less than ``1e-5``), no gradient; ``reg_covar`` defaults to :func:`data_reg_covar` of the points, the
    value the fits compared with this target should use too. Raises ValueError when a batch element has
    fewer (weighted) points than ``n_components``.
    """
    check_points(points)
    point_weights(points, None, sample_weight, n_components)
    reg = data_reg_covar(points, sample_weight) if reg_covar is None else reg_covar
    return fit_gmm(points.detach(), n_components, n_iter=n_iter, tol=TARGET_TOL, fixed_weights=fixed_weights,
                   reg_covar=reg, grad="none", sample_weight=sample_weight, generator=generator).gmm


class MW2Loss(nn.Module):
    """``MW2²`` (or unbalanced ``UMW2²``) between an EM fit of the input points and a fixed target GMM.

    Args:
        target: a :class:`GMM` (batch ``*B`` or unbatched, broadcast against the input's batch), or points
            ``[*B, N, D]`` to which a GMM with ``n_components`` components is fitted once by
            :func:`fit_target` (``fixed_weights`` as below).
        n_components: ``K`` for a target given as points; must be ``None`` or ``target.n_components``
            for a GMM target. The input fits always use the target's ``K``.
        warm_start: one EM step per call from the previous call's (detached, repaired) parameters
            (:class:`imgmw.WarmStartEM`, first call: ``n_iter`` steps); otherwise a fresh fit of
            ``n_iter`` steps per call with gradients unrolled through all of them.
        fixed_weights: keep uniform weights ``1/K`` in the input fits (and in a target fitted here): the
            paper's choice; the default learns them (see the module docstring).
        reg_covar: ``ε_r`` added to the input fits' covariances; ``None``: the target's rule (see the
            module docstring).
        policy: the warm start's :class:`imgmw.warm.FitPolicy` (``None``: the paper's plain Algorithm 3).
        unbalanced: ``(λ_input, λ_target)`` for the unbalanced loss, ``None`` for the balanced one.
        n_iter: EM steps of the warm start's first fit and of every cold fit.
        reduction: ``"mean"`` or ``"sum"`` over the batch, or ``"none"`` for ``[*B]``.
        generator: ``torch.Generator`` for the k-means++ initialisations.
        process_group: ``torch.distributed`` group (or ``imgmw.distributed.WORLD``) over which the input points
            are sharded: every rank passes its shard and the fits run over all ranks' points, so each rank's
            loss is the same MW2² (:mod:`imgmw.distributed`). The target is not sharded: every rank must hold
            the same one (checked).

    Example:
        >>> target = torch.randn(500, 3) * 0.5 + 2
        >>> loss_fn = MW2Loss(target, n_components=3, generator=torch.Generator().manual_seed(0))
        >>> x = torch.randn(500, 3, requires_grad=True)
        >>> loss_fn(x).backward()   # x.grad moves the points towards the target mixture
    """

    target_weights: Tensor   # buffers: the fixed target mixture
    target_means: Tensor
    target_covariances: Tensor

    def __init__(self, target: GMM | Tensor, n_components: int | None = None, *, warm_start: bool = True,
                 fixed_weights: bool = False, reg_covar: float | None = None,
                 unbalanced: tuple[float, float] | None = None, n_iter: int = 30, reduction: str = "mean",
                 policy: FitPolicy | None = FitPolicy(), generator: torch.Generator | None = None,
                 process_group=None) -> None:
        super().__init__()
        self.process_group = check_process_group(process_group)
        self.unbalanced = check_unbalanced(unbalanced)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        if not isinstance(n_iter, int) or n_iter < 1:
            raise ValueError(f"n_iter must be an integer >= 1, got {n_iter!r}")
        if reg_covar is None:
            reg_covar = relative_reg_covar(target) if isinstance(target, GMM) else \
                data_reg_covar(target) if isinstance(target, Tensor) else None
        target = self._target_gmm(target, n_components, fixed_weights, reg_covar, generator)
        check_same_tensor(torch.cat([target.weights.reshape(-1), target.means.reshape(-1),
                                     target.covariances.reshape(-1)]), self.process_group, "the MW2Loss target")
        self.register_buffer("target_weights", target.weights)
        self.register_buffer("target_means", target.means)
        self.register_buffer("target_covariances", target.covariances)
        self.reg_covar = float(reg_covar)
        if not self.reg_covar >= 0:
            raise ValueError(f"reg_covar must be >= 0 or None, got {reg_covar!r}")
        self.n_components = target.n_components
        self.warm_start = warm_start
        self.fixed_weights = fixed_weights
        self.n_iter = n_iter
        self.generator = generator
        self.em = WarmStartEM(self.n_components, fixed_weights=fixed_weights, reg_covar=self.reg_covar,
                              n_init_iter=n_iter, policy=policy, generator=generator,
                              process_group=self.process_group) if warm_start else None

    @staticmethod
    def _target_gmm(target: GMM | Tensor, n_components: int | None, fixed_weights: bool, reg_covar: float | None,
                    generator: torch.Generator | None) -> GMM:
        if isinstance(target, GMM):
            if n_components is not None and n_components != target.n_components:
                raise ValueError(f"n_components={n_components} differs from the target GMM's "
                                 f"{target.n_components} components; leave it None")
            return check_gmm(target.detach(), "target")
        if not isinstance(target, Tensor):
            raise ValueError(f"target must be a GMM or a tensor of points [*B, N, D], got {type(target).__name__}")
        check_points(target)
        if n_components is None:
            raise ValueError("n_components is required when the target is given as points")
        return fit_target(target, n_components, fixed_weights=fixed_weights, reg_covar=reg_covar,
                          generator=generator)

    @property
    def target(self) -> GMM:
        """The fixed target mixture (on this module's device and dtype)."""
        return GMM(self.target_weights, self.target_means, self.target_covariances)

    def start_from_target(self, batch_shape: torch.Size) -> None:
        """Make the warm-started EM's next (re-)initialisation start from the target mixture, broadcast to
        the batch shape ``*B`` of the points to be fitted (a no-op while its state is live)."""
        em = self.em
        if em is None or (em.state is not None and em.state.batch_shape == batch_shape):
            return
        t = self.target
        k, d = t.n_components, t.n_features
        em.init = GMM(t.weights.expand(*batch_shape, k), t.means.expand(*batch_shape, k, d),
                      t.covariances.expand(*batch_shape, k, d, d))

    def reset(self) -> None:
        """Forget the warm-start state: the next call fits the input from scratch."""
        if self.em is not None:
            self.em.reset()

    def fit(self, x: Tensor, *, mask: Tensor | None = None, sample_weight: Tensor | None = None,
            check_finite: bool = True) -> GMM:
        """The differentiable ``K``-component fit of ``x [*B, N, D]`` used by :meth:`forward`
        (optional ``mask`` / ``sample_weight`` ``[*B, N]`` as in :func:`imgmw.fit_gmm`). ``check_finite=False``
        skips the warm start's finiteness check of ``x`` (one host read), for a caller that transports the fit
        with :func:`imgmw.mw2`, whose linear program rejects the non-finite costs of a non-finite fit."""
        check_points(x)
        if self.em is not None:
            return self.em(x, mask=mask, sample_weight=sample_weight, check_finite=check_finite)
        return fit_gmm(x, self.n_components, n_iter=self.n_iter, fixed_weights=self.fixed_weights,
                       reg_covar=self.reg_covar, grad="unrolled", mask=mask, sample_weight=sample_weight,
                       generator=self.generator, process_group=self.process_group).gmm

    def forward(self, x: Tensor, *, mask: Tensor | None = None, sample_weight: Tensor | None = None) -> Tensor:
        """Loss of points ``x [*B, N, D]`` (weighted or masked points as in :meth:`fit`): a scalar
        (``"mean"``/``"sum"``) or ``[*B]`` (``"none"``).

        The transport skips :func:`imgmw.mw2`'s validation of its two mixtures: the target was checked when
        the loss was built and the fit is an M-step's output (normalised weights, covariances made SPD by
        ``reg_covar``), so the linear program's transfer is the only host synchronisation of the transport. Nor
        is ``x`` checked for NaN or inf before the fit: a non-finite point makes the fit and its costs
        non-finite, which the linear program rejects with a ``ValueError`` on the host."""
        target = self.target
        if x.dtype != target.dtype or x.device != target.device:
            raise ValueError(f"x ({x.dtype}, {x.device}) must match the loss's target ({target.dtype}, "
                             f"{target.device}); move the loss with loss.to(x)")
        fit = self.fit(x, mask=mask, sample_weight=sample_weight, check_finite=False)
        value = mw2(fit, target, unbalanced=self.unbalanced, check_input=False)
        if self.reduction == "mean":
            return value.mean()
        if self.reduction == "sum":
            return value.sum()
        return value
