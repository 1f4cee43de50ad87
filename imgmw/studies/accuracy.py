"""Accuracy of the cheap gradients through EM against full autodiff, on random mixtures (d=3, K=3).

For each setting (number of points ``n``, EM steps ``T``, conditioning of the mixtures) and each draw:
the fixed-point error ``‖θ_T − F(θ_T, X)‖²/p`` of the fit, ``‖∂_φF̃‖₂`` (power iteration) and the spectral
radius ``ρ(∂_φF̃)`` at ``θ_T`` (in the implicit solver's coordinates, :mod:`imgmw.implicit`), and the relative
error, against the unrolled (AD) gradient, of the gradient with respect to ``X`` of a loss of the fit for the
one-step (OS), matrix-free implicit (IMP) and dense approximate implicit (AI) gradients.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..em import fit_gmm
from ..gmm import GMM
from ..implicit import AdjointSolveInfo, dense_implicit_gradient, step_jacobian_norm, step_spectral_radius
from ..init import init_gmm
from .measures import fixed_point_error, quartiles, relative_error
from .problems import CONDITIONS, LOSS_NAMES, MODES, Loss, Progress, make_loss, random_gmm, seeded, shifted_target

__all__ = ["accuracy_setting", "accuracy_study"]
GRAPH_BUDGET = 300_000  # draws are batched so that n·T·draws per chunk stays below this (AD's graph)


def _draws(x: Tensor, init: GMM, target_loss: Loss, n_iter: int) -> dict[str, Any]:
    """Per-draw metrics ``[B]`` of one batch of draws: points ``x [B, n, 3]`` and their start ``init``."""
    grads: dict[str, Tensor] = {}
    solves: list[AdjointSolveInfo] = []
    theta = init
    for mode in MODES:
        xx = x.clone().requires_grad_(True)
        opts: dict[str, Callable[[AdjointSolveInfo], None]] | None = (
            {"callback": solves.append} if mode == "implicit" else None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # unconverged solves are counted below
            res = fit_gmm(xx, init.n_components, n_iter=n_iter, init=init, grad=mode, implicit_options=opts)
            (grads[mode],) = torch.autograd.grad(target_loss(res.gmm).sum(), xx)
        if mode == "unrolled":
            theta = res.gmm.detach()
    out: dict[str, Any] = {
        "fixed_point_error": fixed_point_error(theta, x),
        "jacobian_norm": step_jacobian_norm(theta, x, n_iter=50, rtol=1e-4, generator=seeded(0, x.device)),
        "spectral_radius": step_spectral_radius(theta, x, n_iter=40, generator=seeded(1, x.device)),
        "rel_err_one_step": relative_error(grads["one_step"], grads["unrolled"]),
        "rel_err_implicit": relative_error(grads["implicit"], grads["unrolled"]),
        "implicit_unconverged": int((~solves[-1].converged).sum()) if solves else 0}
    w, m, c = (t.clone().requires_grad_(True) for t in (theta.weights, theta.means, theta.covariances))
    g_w, g_m, g_c = torch.autograd.grad(target_loss(GMM(w, m, c)).sum(), (w, m, c))
    ai = dense_implicit_gradient(theta, x, (g_w, g_m, g_c))
    out["rel_err_dense_ai"] = relative_error(ai, grads["unrolled"])
    out["dense_ai_vs_implicit"] = relative_error(ai, grads["implicit"])
    return out


def accuracy_setting(n_points: int, n_iter: int, separation: float, condition: float, draws: int, seed: int,
                     device: torch.device | str | None = None, dtype: torch.dtype = torch.float64,
                     loss: str = "mw2") -> dict[str, Any]:
    """Metrics of one setting: ``draws`` random 3-component 3-D mixtures (:func:`random_gmm`), ``n_points``
    samples of each, a shared k-means++ start, ``n_iter`` EM steps in each gradient mode, the loss against the
    :func:`shifted_target` of the truth. Returns the :func:`quartiles` of every per-draw metric (and the count
    of unconverged implicit solves, ``implicit_unconverged``)."""
    gen = seeded(seed, device)
    truth = random_gmm(draws, 3, 3, separation, condition, gen, dtype, device)
    x, _ = truth.sample(n_points, generator=gen)
    init = init_gmm(x, 3, "kmeans++", generator=gen)
    per_chunk = max(1, GRAPH_BUDGET // (n_points * max(n_iter, 1)))
    parts = []
    for lo in range(0, draws, per_chunk):
        sl = slice(lo, min(lo + per_chunk, draws))
        sub_loss, _ = make_loss(shifted_target(truth[sl]), loss)
        parts.append(_draws(x[sl], init[sl], sub_loss, n_iter))
    merged: dict[str, Any] = {}
    for key in parts[0]:
        if key == "implicit_unconverged":
            merged[key] = sum(p[key] for p in parts)
        else:
            merged[key] = quartiles(torch.cat([p[key] for p in parts]))
    return merged


def accuracy_study(*, n_points: Sequence[int] = (100, 200, 500, 1000, 1500, 2000),
                   n_iter: Sequence[int] = (1, 2, 5, 10, 15, 20, 30, 40), fixed_n_iter: int = 30,
                   fixed_n_points: int = 200, conditions: Sequence[str] = tuple(CONDITIONS), draws: int = 60,
                   seed: int = 0, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64,
                   loss: str = "mw2", progress: Progress | None = None) -> dict[str, Any]:
    """Gradient accuracy of OS / IMP / dense AI against AD, swept over ``n`` and over ``T``.

    Args:
        n_points: the ``n`` of the n sweep (each run with ``fixed_n_iter`` EM steps).
        n_iter: the ``T`` of the T sweep (each run on ``fixed_n_points`` points).
        conditions: names of :data:`CONDITIONS` (separation and covariance condition of the random mixtures).
        draws: random mixtures per setting; setting ``i`` (conditions outer, n sweep then T sweep inner) is
            drawn from the seed ``1000·seed + i``.
        loss: ``"mw2"`` or ``"parameters"`` (:func:`make_loss`).
        progress: optional ``progress(description, done, total)`` called after each setting.

    Returns:
        A JSON-able dict: the settings, ``"sweep_n"`` and ``"sweep_T"`` mapping each condition to a list of rows
        ``{"n", "T", metric: quartiles...}`` (see :func:`accuracy_setting`), ``"n_values"``, ``"T_values"``,
        ``"seconds"``.
    """
    if loss not in LOSS_NAMES:
        raise ValueError(f"loss must be one of {sorted(LOSS_NAMES)}, got {loss!r}")
    settings = [("n", n, fixed_n_iter) for n in n_points] + [("T", fixed_n_points, t) for t in n_iter]
    results: dict[str, Any] = {"command": "accuracy", "d": 3, "K": 3, "draws": draws,
                               "fixed_weights": False, "init": "kmeans++ (shared by all modes)",
                               "implicit_solver": "gmres, tol = sqrt(eps)",
                               "loss": LOSS_NAMES[loss],
                               "conditions": {k: {"separation": CONDITIONS[k][0], "cov_condition": CONDITIONS[k][1]}
                                              for k in conditions},
                               "sweep_n": {}, "sweep_T": {}}
    start = time.perf_counter()
    jobs = [(name, kind, n, t) for name in conditions for kind, n, t in settings]
    for i, (name, kind, n, t) in enumerate(jobs):
        metrics = accuracy_setting(n, t, *CONDITIONS[name], draws, seed * 1000 + i, device, dtype, loss)
        results["sweep_n" if kind == "n" else "sweep_T"].setdefault(name, []).append({"n": n, "T": t, **metrics})
        if progress is not None:
            progress("accuracy", i + 1, len(jobs))
    results["seconds"] = time.perf_counter() - start
    results["n_values"], results["T_values"] = list(n_points), list(n_iter)
    return results
