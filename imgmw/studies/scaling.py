"""Cost of one backward pass through EM as the number of EM steps ``T`` and the dimension ``d`` grow.

For AD (unrolled), IMP (implicit) and OS (one-step): seconds of the forward and backward passes and bytes
saved for backward (:class:`SavedTensorMeter`); for the dense approximate implicit gradient (AI), the bytes of
its Jacobians and, while they fit in a budget, its time. The d sweep unrolls AD over a few steps (its memory is
linear in ``T``, see the T sweep) and runs IMP and OS long enough for EM to converge, which the implicit
gradient assumes and which costs them no memory.
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
from ..implicit import AdjointSolveInfo, dense_implicit_gradient, n_phi
from .measures import fixed_point_error
from .memory import SavedTensorMeter
from .problems import MODES, Loss, Progress, scaling_problem

__all__ = ["DENSE_LIMIT_BYTES", "dense_bytes", "backward_cost", "dense_cost", "scaling_study"]

DENSE_LIMIT_BYTES = 256 * 2**20  # dense AI is attempted while its Jacobians fit in this budget


def dense_bytes(n_components: int, n_features: int, n_points: int, itemsize: int) -> int:
    """Bytes of the dense AI Jacobians ``∂_φF̃ [p, p]`` and ``∂_X F̃ [p, N, D]``."""
    p = n_phi(n_components, n_features, False)
    return (p * p + p * n_points * n_features) * itemsize


def backward_cost(mode: str, x: Tensor, init: GMM, target_loss: Loss, n_iter: int) -> dict[str, Any]:
    """Seconds and saved bytes of one ``fit_gmm`` (gradient ``mode``, ``n_iter`` steps from ``init``) + loss
    (forward) and of the gradient with respect to ``x [*B, N, D]`` (backward); for ``"implicit"`` also the
    adjoint solver's iterations and largest residual."""
    xx = x.clone().requires_grad_(True)
    solves: list[AdjointSolveInfo] = []
    opts: dict[str, Callable[[AdjointSolveInfo], None]] | None = (
        {"callback": solves.append} if mode == "implicit" else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t0 = time.perf_counter()
        with SavedTensorMeter() as fwd:
            loss = target_loss(fit_gmm(xx, init.n_components, n_iter=n_iter, init=init, grad=mode,
                                       implicit_options=opts).gmm).sum()
        t1 = time.perf_counter()
        with SavedTensorMeter() as bwd:
            torch.autograd.grad(loss, xx)
        t2 = time.perf_counter()
    out: dict[str, Any] = {"forward_s": t1 - t0, "backward_s": t2 - t1, "saved_forward_bytes": fwd.bytes,
                           "saved_backward_bytes": bwd.bytes}
    if solves:
        out["solver_iterations"] = solves[-1].iterations
        out["solver_residual"] = float(solves[-1].residual.max())
    return out


def dense_cost(x: Tensor, init: GMM, target_loss: Loss, n_iter: int) -> dict[str, float]:
    """``{"total_s"}``: time of the dense AI gradient at ``θ_T`` (EM without graph, Jacobians, solve)."""
    t0 = time.perf_counter()
    theta = fit_gmm(x, init.n_components, n_iter=n_iter, init=init, grad="none").gmm
    w, m, c = (t.clone().requires_grad_(True) for t in (theta.weights, theta.means, theta.covariances))
    g_w, g_m, g_c = torch.autograd.grad(target_loss(GMM(w, m, c)).sum(), (w, m, c))
    dense_implicit_gradient(theta, x, (g_w, g_m, g_c))
    return {"total_s": time.perf_counter() - t0}


def scaling_study(*, n_iter: Sequence[int] = (1, 2, 5, 10, 20, 50, 100, 200),
                  n_features: Sequence[int] = (3, 6, 12, 24, 48, 96, 192), n_points_t: int = 1000,
                  n_points_d: int = 2000, unrolled_n_iter: int = 10, converged_n_iter: int = 100,
                  dense_limit_bytes: int = DENSE_LIMIT_BYTES, seed: int = 0, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float64, loss: str = "mw2",
                  progress: Progress | None = None) -> dict[str, Any]:
    """Backward cost of every gradient mode against ``T`` (d=3, ``n_points_t`` points, one problem of
    :func:`scaling_problem` from ``seed``) and against ``d`` (``n_points_d`` points, the problem from
    ``seed + d``; AD with ``unrolled_n_iter`` steps, IMP and OS with ``converged_n_iter``).

    Returns a JSON-able dict with ``"sweep_T": {"d", "n", "rows": [{"T", mode: backward_cost...}]}`` and
    ``"sweep_d": {"em_steps", "n", "dense_limit_bytes", "rows": [{"d", mode: ..., "fixed_point_error_at_t_conv",
    "dense_ai": {"estimated_bytes", "total_s" or "skipped"}}]}``. ``progress(description, done, total)``
    (optional) is called after each row.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    steps = {"unrolled": unrolled_n_iter, "one_step": converged_n_iter, "implicit": converged_n_iter}
    x, init, target_loss, name = scaling_problem(3, n_points_t, seed, device, dtype, loss)
    results: dict[str, Any] = {"command": "scaling", "K": 3, "loss": name,
                               "memory": "bytes of distinct storages saved for backward (saved_tensors_hooks)",
                               "sweep_T": {"d": 3, "n": n_points_t, "rows": []},
                               "sweep_d": {"em_steps": steps, "n": n_points_d, "rows": [],
                                           "dense_limit_bytes": dense_limit_bytes}}
    for i, t in enumerate(n_iter):
        row = {"T": t, **{m: backward_cost(m, x, init, target_loss, t) for m in MODES}}
        results["sweep_T"]["rows"].append(row)
        if progress is not None:
            progress("scaling T", i + 1, len(n_iter))
    dense_cost(x, init, target_loss, 1)  # warm-up: functorch's one-time initialisation is not part of the timings
    for i, d in enumerate(n_features):
        xd, init_d, loss_d, _ = scaling_problem(d, n_points_d, seed + d, device, dtype, loss)
        row = {"d": d, **{m: backward_cost(m, xd, init_d, loss_d, steps[m]) for m in MODES}}
        theta = fit_gmm(xd, 3, n_iter=converged_n_iter, init=init_d, grad="none").gmm
        row["fixed_point_error_at_t_conv"] = float(fixed_point_error(theta, xd).max())
        dense: dict[str, Any] = {"estimated_bytes": dense_bytes(3, d, n_points_d, itemsize)}
        if dense["estimated_bytes"] <= dense_limit_bytes:
            dense.update(dense_cost(xd, init_d, loss_d, converged_n_iter))
        else:
            dense["skipped"] = "dense Jacobians exceed the memory budget"
        row["dense_ai"] = dense
        results["sweep_d"]["rows"].append(row)
        if progress is not None:
            progress("scaling d", i + 1, len(n_features))
    return results
