"""Argument checks shared by the mixture-OT functions: valid mixtures, compatible pairs, KL penalties.

A mixture is valid for transport when its values are finite, its weights are non-negative (summing to one
for balanced transport, with a positive total otherwise) and its covariances are symmetric positive
definite. The checks of a pair read one device-side summary per mixture in a single host transfer.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..bures import batch_shape
from ..gmm import GMM

__all__ = ["check_gmm", "check_pair", "check_compatible", "check_unbalanced", "weight_tol", "LAMBDA_RANGE"]


def weight_tol(dtype: torch.dtype) -> float:
    """Tolerance on ``|Σ w − 1|`` (and on covariance asymmetry): ``√eps``, at least 1e-6 (float32 data cast up)."""
    return max(1e-6, math.sqrt(torch.finfo(dtype).eps))


def _summary(g: GMM, name: str) -> Tensor:
    """Device-side summary of ``g`` for :func:`_verdict`, so that several mixtures are checked with one host
    transfer: ``[min w, min Σw, max Σw, min(Σ − Σᵀ), max(Σ − Σᵀ), min Σ, max Σ, Σ m, max Cholesky info]``."""
    if not isinstance(g, GMM):
        raise ValueError(f"{name} must be an imgmw.GMM, got {type(g).__name__}")
    if g.n_components < 1:
        raise ValueError(f"{name} must have at least one component, got K = {g.n_components}")
    with torch.no_grad():
        w, c = g.weights, g.covariances
        info = torch.linalg.cholesky_ex(c)[1].amax()
        return torch.stack([w.amin(), *torch.aminmax(w.sum(-1)), *torch.aminmax(c - c.mT), *torch.aminmax(c),
                            g.means.sum(), info.to(w.dtype)])


def _verdict(g: GMM, name: str, summary: list[float], normalised: bool) -> None:
    """Raise ``ValueError`` naming ``name`` if the host copy of :func:`_summary` shows an invalid mixture."""
    w_min, mass_min, mass_max, asym_min, asym_max, c_min, c_max, _, info = summary
    if not all(map(math.isfinite, summary)):  # a NaN/inf anywhere propagates into these reductions
        raise ValueError(f"{name} has NaN or inf in its weights, means or covariances")
    if w_min < 0:
        raise ValueError(f"{name}.weights must be >= 0, got a minimum of {w_min:.3g}")
    off = max(abs(mass_min - 1), abs(mass_max - 1))
    if normalised and off > weight_tol(g.dtype):
        raise ValueError(f"{name}.weights must sum to 1 over the components (off by up to {off:.3g}); "
                         "normalise them, e.g. w / w.sum(-1, keepdim=True)")
    if not normalised and mass_min <= 0:
        raise ValueError(f"{name}.weights must have a positive total mass")
    asym = max(-asym_min, asym_max)
    if asym > weight_tol(g.dtype) * max(-c_min, c_max, 1e-30):
        raise ValueError(f"{name}.covariances must be symmetric (max |Σ − Σᵀ| = {asym:.3g}); "
                         "symmetrise them with (Σ + Σᵀ)/2")
    if info == 0:
        return
    # not numerically SPD: jitter may repair round-off, never a negative eigenvalue
    c, m = g.covariances.detach(), g.means.detach()
    lam = torch.linalg.eigvalsh(c.double())
    # round-off of a covariance computed from moments (an EM fit of near-constant data, say) is relative to
    # the second moment Σ + m mᵀ of the data, which was about the previous means: at least O(1) for data
    # on the image scale. −I or diag(1, −5) are far beyond it in every dtype.
    scale = (lam.abs().amax(-1) + m.double().square().sum(-1)).clamp_min(1.0)
    if bool((lam[..., 0] < -weight_tol(c.dtype) * scale).any()):
        raise ValueError(f"{name}.covariances must be symmetric positive definite: an eigenvalue is "
                         f"{float(lam[..., 0].min()):.3g}")
    try:
        g.check_cholesky()
    except ValueError as err:
        raise ValueError(f"{name}.covariances must be symmetric positive definite: {err}") from None


def check_gmm(g: GMM, name: str, *, normalised: bool = True) -> GMM:
    """Validate a GMM for transport: finite values, weights ≥ 0 (summing to one if ``normalised``, else
    with a positive total), symmetric positive-definite covariances. One host synchronisation."""
    _verdict(g, name, _summary(g, name).tolist(), normalised)
    return g


def check_pair(a: GMM, b: GMM, names: tuple[str, str] = ("a", "b"), *, normalised: bool = True) -> torch.Size:
    """:func:`check_gmm` of both mixtures (one host synchronisation), then their compatibility; returns the
    broadcast batch shape."""
    summaries = torch.stack([_summary(a, names[0]), _summary(b, names[1]).to(a.device)]).tolist()
    _verdict(a, names[0], summaries[0], normalised)
    _verdict(b, names[1], summaries[1], normalised)
    return check_compatible(a, b, names)


def check_compatible(a: GMM, b: GMM, names: tuple[str, str] = ("a", "b")) -> torch.Size:
    """Same ``D``, dtype and device, broadcasting batch shapes (no host synchronisation); returns the batch shape."""
    if a.n_features != b.n_features:
        raise ValueError(f"{names[0]} and {names[1]} must share the dimension D, "
                         f"got D={a.n_features} and D={b.n_features}")
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"{names[0]} ({a.dtype}, {a.device}) and {names[1]} ({b.dtype}, {b.device}) "
                         "must share dtype and device")
    try:
        return batch_shape(a, b)
    except RuntimeError:
        raise ValueError(f"batch shapes {tuple(a.batch_shape)} of {names[0]} and {tuple(b.batch_shape)} of "
                         f"{names[1]} do not broadcast") from None


LAMBDA_RANGE = (1e-8, 1e8)  # KL penalties outside it overflow the solver's exp(−cost/λ)-free duals (inf at 1e300)


def check_unbalanced(unbalanced) -> tuple[float, float] | None:
    """``None`` or a pair of ``λ`` in ``LAMBDA_RANGE`` as floats; anything else raises ``ValueError``."""
    if unbalanced is None:
        return None
    try:
        lam_a, lam_b = (float(v) for v in unbalanced)
    except (TypeError, ValueError):
        raise ValueError(f"unbalanced must be None or a pair (lam_a, lam_b), got {unbalanced!r}") from None
    for lam, side in ((lam_a, "lam_a"), (lam_b, "lam_b")):
        if not (LAMBDA_RANGE[0] <= lam <= LAMBDA_RANGE[1]):
            raise ValueError(f"unbalanced {side} must lie in [{LAMBDA_RANGE[0]:g}, {LAMBDA_RANGE[1]:g}], got {lam!r} "
                             "(use unbalanced=None for the balanced distance)")
    return lam_a, lam_b
