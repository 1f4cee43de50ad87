"""Batched, differentiable EM for Gaussian mixtures.

One EM step is the map ``θ' = F(θ, X)`` (:func:`imgmw.mstep.em_map`): an E-step (responsibilities in the log
domain) fused with the accumulation of additive sufficient statistics (:mod:`imgmw.stats`), then the M-step
(:func:`imgmw.mstep.m_step`)

    w_k = s0_k / Σ_j s0_j,   m_k = c_k + s1_k / s0_k,   Σ_k = s2_k / s0_k − δ_k δ_kᵀ + ε_r I,

with ``δ_k = s1_k / s0_k`` and ``c_k`` the previous means. :func:`fit_gmm` iterates ``F`` with per-batch-
element convergence and one of four gradient strategies; :class:`imgmw.warm.WarmStartEM` is the paper's
Algorithm 3 (one step per call from the previous, detached parameters) with a fit-keeping policy.

Memory of a fit: the inputs, ``O(B·K·D²)`` parameters and statistics, and per-chunk temporaries of about
``4·CHUNK_ELEMENTS`` elements (16 MiB in float32), independent of ``N`` when gradients are off; the
returned ``log_resp`` adds ``B·N·K`` elements. With gradients off the chunk temporaries live in one
:class:`imgmw.stats.Workspace` per fit, allocated in the first step and reused by every chunk of every step, so
an EM step allocates only ``O(B·K·D²)`` parameters and statistics. With gradients on, autograd keeps the chunk
temporaries of every step (``O(T·B·N·K·D)``), as full unrolling requires.

The loop never waits for the device with ``tol=None``, and once per step (the early-stopping test) with a
``tol``: see :func:`_iterate` for how a failed Cholesky factorisation is still caught and repaired.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .distributed import all_reduce_sum, check_process_group, check_same_problem, check_same_tensor
from .gmm import GMM
from .implicit import implicit_em_fixed_point
from .init import INIT_METHODS, init_gmm
from .mstep import em_map, m_step
from .stats import QuadFeatures, WhitenedFeatures, Workspace, e_step, e_step_unchecked, point_features
from .validation import check_choice, check_points, check_reg_covar, check_valid_counts, point_weights, valid_counts

__all__ = ["EMResult", "GRAD_MODES", "m_step", "em_step", "fit_gmm", "e_step"]

GRAD_MODES = ("unrolled", "implicit", "one_step", "none")


@dataclass
class EMResult:
    """Output of :func:`fit_gmm`.

    Attributes:
        gmm: fitted mixture, batch ``*B``.
        log_resp: ``[*B, N, K]`` log-responsibilities under the fitted parameters.
        lower_bound: ``[*B]`` weighted mean log-likelihood of the points under the parameters of the
            last E-step (scikit-learn's ``lower_bound_``).
        n_iter: ``[*B]`` EM steps each batch element took.
        converged: ``[*B]`` whether the change of ``lower_bound`` fell below ``tol``.
    """

    gmm: GMM
    log_resp: Tensor
    lower_bound: Tensor
    n_iter: Tensor
    converged: Tensor


def _check_gmm_matches(gmm: GMM, x: Tensor) -> None:
    if gmm.batch_shape != x.shape[:-2] or gmm.n_features != x.shape[-1]:
        raise ValueError(
            f"GMM with batch {tuple(gmm.batch_shape)} and D={gmm.n_features} does not match points of shape "
            f"{tuple(x.shape)} (expected [*B, N, D] with *B={tuple(gmm.batch_shape)})")
    if gmm.dtype != x.dtype or gmm.device != x.device:
        raise ValueError(f"GMM ({gmm.dtype}, {gmm.device}) and x ({x.dtype}, {x.device}) must share dtype and device")


def em_step(gmm: GMM, x: Tensor, *, mask: Tensor | None = None, sample_weight: Tensor | None = None,
            reg_covar: float = 1e-6, fixed_weights: bool = False, chunk_size: int | None = None) -> GMM:
    """One EM step ``F(θ, X)``: E-step then M-step, differentiable in ``gmm`` and ``x``.

    Args:
        gmm: current parameters θ, batch ``*B``.
        x: ``[*B, N, D]`` points.
        mask: optional ``[*B, N]`` booleans; ``False`` points are ignored exactly.
        sample_weight: optional ``[*B, N]`` non-negative weights (a weight of 2 equals a repeated point).
        reg_covar: ``ε_r ≥ 0`` added to every covariance's diagonal.
        fixed_weights: keep ``gmm.weights`` (the paper's fixed-weights EM).
    """
    check_points(x)
    check_reg_covar(reg_covar)
    _check_gmm_matches(gmm, x)
    x, weight = point_weights(x, mask, sample_weight, 1)
    return em_map(gmm.check_cholesky(), x, weight, reg_covar, fixed_weights, chunk_size)[0]


def _initial_gmm(x: Tensor, weight: Tensor | None, n_components: int, init: str | GMM, fixed_weights: bool,
                 reg_covar: float, generator: torch.Generator | None, chunk_size: int | None,
                 process_group=None, features: QuadFeatures | WhitenedFeatures | None = None) -> GMM:
    if isinstance(init, GMM):
        if init.n_components != n_components:
            raise ValueError(f"init GMM has {init.n_components} components, n_components={n_components}")
        _check_gmm_matches(init, x)
        check_same_tensor(torch.cat([init.weights.reshape(-1), init.means.reshape(-1), init.covariances.reshape(-1)]),
                          process_group, "the init GMM")
        return init
    check_choice("init", init, INIT_METHODS)
    gmm = init_gmm(x, n_components, init, sample_weight=weight, reg_covar=reg_covar, generator=generator,
                   chunk_size=chunk_size, process_group=process_group, features=features)
    if fixed_weights:
        gmm = GMM(torch.full_like(gmm.weights, 1.0 / n_components), gmm.means, gmm.covariances)
    return gmm


def fit_gmm(x: Tensor, n_components: int, *, n_iter: int = 100, tol: float | None = None,
            init: str | GMM = "kmeans++", fixed_weights: bool = False, reg_covar: float = 1e-6,
            grad: str = "unrolled", mask: Tensor | None = None, sample_weight: Tensor | None = None,
            generator: torch.Generator | None = None, chunk_size: int | None = None,
            implicit_options: dict | None = None, process_group=None) -> EMResult:
    """Fit ``B`` Gaussian mixtures at once by EM.

    Args:
        x: ``[*B, N, D]`` points (float32 or float64).
        n_components: ``K ≥ 1``.
        n_iter: maximum number of EM steps ``T ≥ 1``.
        tol: stop a batch element when its mean log-likelihood changes by less than ``tol``; ``None``
            runs exactly ``n_iter`` steps (what differentiable pipelines usually want).
        init: ``"kmeans++"``, ``"kmeans"``, ``"random"``, ``"random_from_data"`` (see
            :mod:`imgmw.init`) or a :class:`GMM` with batch ``*B``.
        fixed_weights: keep the initial weights; with a string ``init`` they are uniform, ``1/K``.
        reg_covar: ``ε_r ≥ 0`` added to the covariances' diagonals.
        grad: ``"unrolled"`` (autograd through all steps), ``"one_step"`` (steps without gradient, then
            one differentiable step from the detached result), ``"implicit"`` (implicit-function
            gradient at the output, :mod:`imgmw.implicit`) or ``"none"`` (detached output).
        mask: ``[*B, N]`` booleans for ragged sets; sample_weight: ``[*B, N]`` weights ≥ 0.
        generator: ``torch.Generator`` for the random initialisations.
        chunk_size: points per chunk (default from a fixed temporary budget).
        implicit_options: keyword arguments of the implicit backward (``grad="implicit"``): ``solver``
            (``"gmres"`` default, ``"cg"``, ``"fixed_point"``), ``tol``, ``max_iter``, ``callback``; the last
            solve's residuals are in :func:`imgmw.implicit.last_solve_info`.
        process_group: a ``torch.distributed`` group (or ``imgmw.distributed.WORLD``): ``x`` (with its
            ``mask``/``sample_weight``) is this rank's shard, of any size ``N``; the statistics, the lower
            bound, the convergence test and the initialisation run over the concatenated shards, and every
            rank returns the same GMM as a one-process fit of the concatenated data from the same ``init``
            (:mod:`imgmw.distributed`). ``log_resp`` is this rank's. Gradients flow in the ``"unrolled"`` and
            ``"one_step"`` modes (each rank receives the gradient of the sum of all ranks' losses).

    Returns:
        :class:`EMResult`. The initialisation never carries gradients unless ``init`` is a GMM that does.
    """
    check_points(x)
    check_choice("grad", grad, GRAD_MODES)
    check_reg_covar(reg_covar)
    if not isinstance(n_components, int) or n_components < 1:
        raise ValueError(f"n_components must be an integer >= 1, got {n_components!r}")
    if not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be an integer >= 1, got {n_iter!r}")
    if tol is not None and not tol >= 0:
        raise ValueError(f"tol must be >= 0 or None, got {tol!r}")
    group = check_process_group(process_group)
    if group is not None and grad == "implicit":
        raise ValueError("grad='implicit' is not available with a process_group (its backward solve is not "
                         "distributed); use 'unrolled' or 'one_step'")
    check_same_problem(x, n_components, group)
    x, weight = point_weights(x, mask, sample_weight, None if group is not None else n_components)
    if group is not None:
        check_valid_counts(all_reduce_sum(valid_counts(x, weight), group), n_components)
    n_free = n_iter - 1 if grad in ("one_step", "implicit") else n_iter
    track = grad == "unrolled"
    with torch.set_grad_enabled(track and torch.is_grad_enabled()):
        features = point_features(x, weight)  # the kernels' features of X, once per fit (init and every step)
    gmm = _initial_gmm(x, weight, n_components, init, fixed_weights, reg_covar, generator, chunk_size, group,
                       features)
    workspace = Workspace()  # the E-step's scratch, for every step and the final E-step
    final = grad in ("unrolled", "none")  # the loop's output is the fitted mixture: factorise it in the loop
    gmm, (_, converged, steps, lower) = _iterate(
        gmm, n_free, _Loop(x, weight, reg_covar, fixed_weights, chunk_size, features, group, workspace, tol, track),
        factorise_output=final)
    if not final:
        gmm, lower, steps, converged = _last_step(gmm, x, weight, reg_covar, fixed_weights, chunk_size,
                                                  grad, lower, steps, converged, tol, implicit_options, group)
    if grad == "none":
        gmm = gmm.detach()
    with torch.set_grad_enabled(grad != "none" and torch.is_grad_enabled()):
        if final:  # x was checked on entry and the factors of gmm by _iterate
            log_resp, _ = e_step_unchecked(gmm, x, chunk_size, features, workspace)
        else:  # the cached features carry no graph in these modes
            log_resp, _ = e_step(gmm, x, chunk_size, workspace=workspace)
    return EMResult(gmm, log_resp, lower, steps, converged)


@dataclass
class _Loop:
    """What the EM steps of one fit share: points, weights, settings, cached features, workspace, ``tol`` and
    whether autograd records the steps (``track``)."""

    x: Tensor
    weight: Tensor | None
    reg_covar: float
    fixed_weights: bool
    chunk_size: int | None
    features: QuadFeatures | WhitenedFeatures | None
    group: object
    workspace: Workspace
    tol: float | None
    track: bool


_State = tuple[Tensor, Tensor, Tensor, Tensor]  # per instance [*B]: done, converged, steps taken, lower bound


def _step(gmm: GMM, state: _State, loop: _Loop) -> tuple[GMM, _State]:
    """One EM step with per-instance convergence: converged instances are frozen by ``GMM.where``
    (branch-free) and an instance converges when its lower bound changes by less than ``tol``. Without a ``tol``
    no instance stops, and the state is the step count and the lower bound."""
    done, converged, steps, lower = state
    with torch.set_grad_enabled(loop.track and torch.is_grad_enabled()):
        new, ll = em_map(gmm, loop.x, loop.weight, loop.reg_covar, loop.fixed_weights, loop.chunk_size,
                         loop.features, loop.group, loop.workspace)
    if loop.tol is None:
        return new, (done, converged, steps + 1, ll.detach())
    with torch.set_grad_enabled(loop.track and torch.is_grad_enabled()):
        gmm = GMM.where(done, gmm, new)
    steps = steps + (~done).long()
    converged = converged | (~done & ((ll - lower).abs() < loop.tol))
    lower = torch.where(done, lower, ll.detach())
    return gmm, (converged, converged, steps, lower)


def _iterate(gmm: GMM, n_steps: int, loop: _Loop, factorise_output: bool = False) -> tuple[GMM, _State]:
    """Up to ``n_steps`` EM steps from ``gmm``, stopping early once every instance converged (with a ``tol``);
    with ``factorise_output`` the returned mixture carries checked Cholesky factors.

    Host synchronisation: none per step with ``tol=None``, one per step (the early-stopping test) with a
    ``tol``, and one per fit. Each step factorises its input with :meth:`GMM.factorise_unchecked`, which keeps
    the failure flags on the device (a failed factor is NaN, never used as a number), and the loop keeps
    every step's input and state. The flags are read where the loop synchronises anyway: at the
    early-stopping test, which then also stops at a failed step, and once after the loop (with the flags of
    the output's factorisation, when asked for). After a failure the steps are redone from the input of the
    first failed step with jitter-escalated factors (:attr:`GMM.cholesky`, checked by :meth:`GMM.check_cholesky`:
    its ``ValueError`` when no jitter helps), which gives exactly the result of escalating at every step, while
    the steps before it are kept: their factors equal the escalated ones bit for bit. Failures need nearly
    singular covariances (``reg_covar`` small against the spread, e.g. few points per component in high
    dimension), so the common path never waits for the device and factorises once per step.
    :attr:`GMM.cholesky` alone (the escalation folded into tensor ops) would need no check but factorises nine
    times: 5% of a colour fit's step.
    """
    x = loop.x
    done = torch.zeros(x.shape[:-2], dtype=torch.bool, device=x.device)
    state = (done, done, torch.zeros_like(done, dtype=torch.long),
             torch.full(done.shape, -torch.inf, dtype=x.dtype, device=x.device))
    trail: list[tuple[GMM, _State]] = []  # input and state of every unchecked step
    flags: list[Tensor] = []  # their factorisations' failures [*B, K], then the output's
    for _ in range(n_steps):
        factorised, failed = gmm.factorise_unchecked()
        trail.append((gmm, state))
        flags.append(failed)
        gmm, state = _step(factorised, state, loop)
        if loop.tol is not None and bool(state[0].all() | failed.any()):
            break
    output = gmm
    if factorise_output:
        output, failed = gmm.factorise_unchecked()
        flags.append(failed)
    failures = torch.stack(flags).flatten(1).any(1) if flags else None
    if failures is not None and bool(failures.any()):
        first = int(failures.long().argmax())  # read only after a failure
        if first < len(trail):
            gmm, state = trail[first]
            for _ in range(first, n_steps):
                gmm, state = _step(gmm.check_cholesky(), state, loop)
                if loop.tol is not None and bool(state[0].all()):
                    break
        output = gmm.check_cholesky() if factorise_output else gmm
    return output, state


def _last_step(gmm: GMM, x: Tensor, weight: Tensor | None, reg_covar: float, fixed_weights: bool,
               chunk_size: int | None, grad: str, lower: Tensor, steps: Tensor, converged: Tensor,
               tol: float | None, implicit_options: dict | None, group=None):
    """The final, differentiable step of the ``one_step`` and ``implicit`` modes."""
    prev = gmm.detach()
    if grad == "one_step":
        new, ll = em_map(prev, x, weight, reg_covar, fixed_weights, chunk_size, process_group=group)
    else:
        new, ll = implicit_em_fixed_point(prev, x, weight, reg_covar=reg_covar, fixed_weights=fixed_weights,
                                          chunk_size=chunk_size, **(implicit_options or {}))
    if tol is not None:
        converged = converged | ((ll.detach() - lower).abs() < tol)
    return new, ll.detach(), steps + 1, converged
