"""Argument checks shared by the mixture-OT functions: valid mixtures, compatible pairs, KL penalties.

A mixture is valid for transport when its values are finite, its weights are non-negative (summing to one
for balanced transport, with a positive total otherwise) and its covariances are symmetric positive
definite. The checks of a pair read one device-side summary per mixture in a single host transfer, or ride along
with a transfer that is due anyway (:func:`transfer_check`: the linear program of a transport).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ..bures import batch_shape
from ..gmm import GMM

__all__ = ["check_gmm", "check_pair", "check_mixture_type", "pair_summary", "pair_verdict", "transfer_check",
           "check_compatible", "check_unbalanced", "weight_tol", "LAMBDA_RANGE"]


def weight_tol(dtype: torch.dtype) -> float:
    """Tolerance on ``|Σ w − 1|`` (and on covariance asymmetry): ``√eps``, at least 1e-6 (float32 data cast up)."""
    return max(1e-6, math.sqrt(torch.finfo(dtype).eps))


def check_mixture_type(g: GMM, name: str) -> None:
    """``ValueError`` unless ``g`` is an :class:`imgmw.GMM` with at least one component (no host read)."""
    if not isinstance(g, GMM):
        raise ValueError(f"{name} must be an imgmw.GMM, got {type(g).__name__}")
    if g.n_components < 1:
        raise ValueError(f"{name} must have at least one component, got K = {g.n_components}")


SUMMARY_SIZE = 9  # entries of one mixture's summary
HOST_CHECK_ELEMENTS = 1 << 12  # up to this many covariance entries in a pair, it is checked on the host


def _summary(g: GMM, failed: Tensor | None = None) -> list[Tensor]:
    """Device-side summary of ``g`` for :func:`_verdict`, so that several mixtures are checked with one host
    transfer: the ``SUMMARY_SIZE`` 0-d tensors ``[min w, min Σw, max Σw, min(Σ − Σᵀ), max(Σ − Σᵀ), min Σ, max Σ,
    Σ m, Cholesky failed]``. ``failed`` (``[*B, K]`` booleans) is the outcome of a Cholesky factorisation of the
    covariances done by the caller (:func:`imgmw.linalg.cholesky_unchecked`); by default one is done here."""
    with torch.no_grad():
        w, c = g.weights, g.covariances
        if failed is None:
            failed = torch.linalg.cholesky_ex(c)[1] > 0
        return [w.amin(), *torch.aminmax(w.sum(-1)), *torch.aminmax(c - c.mT), *torch.aminmax(c), g.means.sum(),
                failed.any().to(w.dtype)]


def _looks_valid(w: np.ndarray, c: np.ndarray, dtype: torch.dtype, normalised: bool, spd: bool) -> bool:
    """Whether a mixture's finite host copy (``w [*B, K]``, ``c [*B, K, D, D]``) passes :func:`_verdict`'s tests, but
    the SPD test of the covariances unless ``spd`` (NumPy's Cholesky then); NaN fails every comparison."""
    tol, mass = weight_tol(dtype), w.sum(-1)
    if not (w.min() >= 0 and (np.abs(mass - 1).max() <= tol if normalised else mass.min() > 0)):
        return False
    if not np.abs(c - np.swapaxes(c, -1, -2)).max() <= tol * max(np.abs(c).max(), 1e-30):
        return False
    if spd:
        try:
            np.linalg.cholesky(c)
        except np.linalg.LinAlgError:
            return False
    return True


def transfer_check(a: GMM, b: GMM, names: tuple[str, str], *, normalised: bool = True,
                   a_failed: Tensor | None = None) -> tuple[list[Tensor], Callable[[np.ndarray], None]]:
    """The checks of :func:`check_pair` (but the compatibility) split around a host transfer that is due anyway:
    ``(tensors, inspect)``, where ``tensors`` are to be sent to the host (flattened and concatenated, in ``a``'s dtype)
    and ``inspect`` raises the ``ValueError`` of an invalid mixture from their host copy.

    Small mixtures (at most ``HOST_CHECK_ELEMENTS`` covariance entries in all) are sent whole and screened on the
    host (:func:`_looks_valid`: a few NumPy calls instead of two dozen small device operations), and only a
    mixture failing the screen is checked by :func:`check_pair` (one more host read, on the way to its error). The
    SPD test of ``a`` is left to the caller: its factorisation fails on the device, with NaN factors. Larger
    mixtures are summarised on the device (:func:`pair_summary`, ``a_failed`` as there).
    """
    if a.covariances.numel() + b.covariances.numel() > HOST_CHECK_ELEMENTS:
        return [pair_summary(a, b, a_failed)], functools.partial(pair_verdict, a, b, names=names,
                                                                 normalised=normalised)
    tensors = [a.weights, a.covariances, b.weights, b.covariances]  # sent without autograd recording
    sizes = np.cumsum([t.numel() for t in tensors])

    def inspect(host: np.ndarray) -> None:
        wa, ca, wb, cb = (host[start:end].reshape(t.shape) for start, end, t in zip([0, *sizes[:-1]], sizes, tensors))
        if not (np.isfinite(host).all() and _looks_valid(wa, ca, a.dtype, normalised, False)
                and _looks_valid(wb, cb, b.dtype, normalised, True)):
            check_pair(a, b, names, normalised=normalised)

    return tensors, inspect


def pair_summary(a: GMM, b: GMM, a_failed: Tensor | None = None) -> Tensor:
    """``[2 · SUMMARY_SIZE]`` device summaries of ``a`` then ``b`` (in ``a``'s dtype and device) for
    :func:`pair_verdict`; ``a_failed`` as ``failed`` of :func:`_summary` for ``a``."""
    return torch.stack(_summary(a, a_failed) + [t.to(a.device) for t in _summary(b)])


def pair_verdict(a: GMM, b: GMM, summary, names: tuple[str, str] = ("a", "b"), *, normalised: bool = True) -> None:
    """Raise ``ValueError`` naming the mixture if the host copy ``summary`` (a sequence of ``2 · SUMMARY_SIZE``
    floats) of :func:`pair_summary` shows an invalid mixture."""
    values = [float(v) for v in summary]
    _verdict(a, names[0], values[:SUMMARY_SIZE], normalised)
    _verdict(b, names[1], values[SUMMARY_SIZE:], normalised)


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
    check_mixture_type(g, name)
    _verdict(g, name, torch.stack(_summary(g)).tolist(), normalised)
    return g


def check_pair(a: GMM, b: GMM, names: tuple[str, str] = ("a", "b"), *, normalised: bool = True) -> torch.Size:
    """:func:`check_gmm` of both mixtures (one host synchronisation), then their compatibility; returns the
    broadcast batch shape."""
    check_mixture_type(a, names[0])
    check_mixture_type(b, names[1])
    pair_verdict(a, b, pair_summary(a, b).tolist(), names, normalised=normalised)
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
