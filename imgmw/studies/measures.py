"""What the gradient studies measure, and how their draws are summarised: relative gradient errors, the
fixed-point error of an EM fit, quartiles, log-log slopes."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..em import em_step
from ..gmm import GMM

__all__ = ["relative_error", "theta_vector", "fixed_point_error", "quartiles", "loglog_slope", "first_below"]


def relative_error(g: Tensor, ref: Tensor) -> Tensor:
    """``‖g − ref‖ / ‖ref‖`` per batch element over the trailing ``[N, D]`` dims: ``[*B, N, D] -> [*B]``."""
    return (g - ref).flatten(-2).norm(dim=-1) / ref.flatten(-2).norm(dim=-1)


def theta_vector(gmm: GMM) -> Tensor:
    """``(w, m, vech Σ)`` flattened per batch element: ``[*B, p]`` with ``p = K + K·D + K·D(D+1)/2``."""
    d = gmm.n_features
    rows, cols = torch.tril_indices(d, d, device=gmm.device)
    return torch.cat([gmm.weights, gmm.means.flatten(-2), gmm.covariances[..., rows, cols].flatten(-2)], -1)


def fixed_point_error(gmm: GMM, x: Tensor, fixed_weights: bool = False) -> Tensor:
    """``‖θ − F(θ, X)‖² / p`` ``[*B]`` for ``θ = (w, m, vech Σ)`` of ``gmm`` and points ``x [*B, N, D]``
    (``F`` one EM step, :func:`imgmw.em_step`): zero exactly at a fixed point of EM."""
    with torch.no_grad():
        diff = theta_vector(gmm) - theta_vector(em_step(gmm, x, fixed_weights=fixed_weights))
    return diff.square().sum(-1) / diff.shape[-1]


def quartiles(values: Tensor) -> dict[str, float]:
    """``{"median", "q25", "q75", "count", "non_finite"}`` of the finite entries of ``values`` (any shape);
    non-finite entries are counted and dropped (all NaN statistics when none is finite).

    >>> quartiles(torch.tensor([1.0, 2.0, 3.0, float("nan")]))["median"]
    2.0
    """
    v = values.detach().double().flatten().cpu()
    finite = v[torch.isfinite(v)]
    if finite.numel() == 0:
        return {"median": math.nan, "q25": math.nan, "q75": math.nan, "count": 0, "non_finite": int(v.numel())}
    q = torch.quantile(finite, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return {"median": float(q[1]), "q25": float(q[0]), "q75": float(q[2]), "count": int(finite.numel()),
            "non_finite": int(v.numel() - finite.numel())}


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x`` over the pairs with both positive (NaN with fewer
    than two such pairs).

    >>> round(loglog_slope([1, 4, 16], [1.0, 0.5, 0.25]), 12)
    -0.5
    """
    pts = [(math.log(a), math.log(b)) for a, b in zip(xs, ys) if a > 0 and b > 0]
    if len(pts) < 2:
        return math.nan
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    var = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / var


def first_below(values: Sequence[float], threshold: float) -> int | None:
    """Index of the first value below ``threshold`` (``None`` if there is none)."""
    return next((i for i, v in enumerate(values) if v < threshold), None)
