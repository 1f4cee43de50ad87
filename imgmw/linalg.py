"""Small batched linear-algebra helpers with the numerical safeguards imgmw relies on.

Every function works on leading batch dimensions ``*B`` and keeps autograd intact.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "symmetrize",
    "safe_cholesky",
    "cholesky_jittered",
    "cholesky_unchecked",
    "cholesky_inverse_transpose",
    "log_det_from_cholesky",
    "add_to_diagonal",
    "all_finite",
]

FINITE_CHUNK = 1 << 22  # entries per chunk of the element-wise fallback of all_finite

_MAX_JITTER_STEPS = 8


def symmetrize(a: Tensor) -> Tensor:
    """Return ``(A + Aᵀ) / 2`` for ``a [*B, D, D]``."""
    return 0.5 * (a + a.mT)


def add_to_diagonal(a: Tensor, value: Tensor | float) -> Tensor:
    """Return ``A + value·I`` for ``a [*B, D, D]``; ``value`` is a scalar or broadcasts to ``[*B]``."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    if isinstance(value, Tensor):
        value = value[..., None, None]
    return a + value * eye


def _diag_scale(a: Tensor) -> Tensor:
    """Mean diagonal magnitude ``[*B]`` of ``a [*B, D, D]``: the scale of the jitter."""
    return a.diagonal(dim1=-2, dim2=-1).abs().mean(-1)


def _jitter(scale: Tensor, level: Tensor | int) -> Tensor:
    """The jitter ``eps · scale · 10^level`` of escalation level ``level`` (0: none). A tensor ``level`` indexes
    powers of ten built on the device (no host transfer) as exact products, so that both Cholesky functions
    round the same numbers."""
    if isinstance(level, int):
        return scale * torch.finfo(scale.dtype).eps * 10.0 ** level
    powers = torch.full((_MAX_JITTER_STEPS + 1,), 10.0, dtype=scale.dtype, device=scale.device).cumprod(0) / 10.0
    return scale * torch.finfo(scale.dtype).eps * torch.where(level > 0, powers[level], 0.0)


def safe_cholesky(a: Tensor, *, what: str = "covariance") -> Tensor:
    """Lower Cholesky factor ``L`` with ``A = L Lᵀ`` for symmetric ``a [*B, D, D]``, escalating jitter.

    Matrices that are not numerically positive definite get ``ε·s·I`` added, where ``s`` is the mean
    diagonal magnitude of that matrix and ``ε`` grows tenfold from the dtype's machine epsilon (at most
    eight steps, i.e. up to ``1e8·eps·s``). Only the failing matrices are touched, so well-conditioned
    inputs give exactly ``torch.linalg.cholesky``'s result. Raises ``ValueError`` naming ``what`` if a
    matrix is still not positive definite (non-finite entries, or strongly indefinite input) or is
    numerically zero (no scale to make a jitter relative to).

    Reads the device once (more after a failure); :func:`cholesky_jittered` computes the same factors without
    reading it.
    """
    chol, info = torch.linalg.cholesky_ex(a)
    if not bool((info > 0).any()):
        return chol
    eps = torch.finfo(a.dtype).eps
    scale = _diag_scale(a)
    failed = info > 0
    if bool((failed & (scale < torch.finfo(a.dtype).tiny / eps)).any()):
        raise ValueError(
            f"{what}: a matrix is numerically zero (a component collapsed onto a single point), so no "
            "relative jitter can make it positive definite; use reg_covar > 0"
        )
    jitter = torch.zeros_like(scale)
    for step in range(_MAX_JITTER_STEPS):
        jitter = torch.where(failed, _jitter(scale, step + 1), jitter)
        chol, info = torch.linalg.cholesky_ex(add_to_diagonal(a, jitter))
        failed = info > 0
        if not bool(failed.any()):
            return chol
    bad = int(failed.sum())
    if not bool(torch.isfinite(a).all()):
        raise ValueError(f"{what}: {bad} matrix/matrices hold NaN or inf, so are not positive definite (e.g. fitted "
                         "to non-finite points)")
    raise ValueError(
        f"{what}: {bad} matrix/matrices are not positive definite even with jitter "
        f"{float(jitter.max()):.3g}; check for NaN/inf values or increase reg_covar"
    )


def cholesky_jittered(a: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`safe_cholesky` without reading the device: ``(L, failed)`` for symmetric ``a [*B, D, D]``.

    The escalation is folded into tensor ops: every jitter level (0, no jitter, to eight) is factorised in
    ONE batched ``cholesky_ex`` of ``[9, *B, D, D]`` (without autograd), and each matrix takes the first level
    that succeeds, which is :func:`safe_cholesky`'s factor bit for bit. When autograd records, that level's
    jitter is applied in one more, differentiable factorisation: the graph :func:`safe_cholesky` builds. The
    matrices :func:`safe_cholesky` rejects (no level succeeds, or numerically zero) get NaN factors and
    ``failed [*B]`` true, on the device; reading it (:meth:`imgmw.gmm.GMM.check_cholesky`) raises the error.
    The price is nine factorisations instead of one; the EM loop, which factorises every step, uses
    :func:`cholesky_unchecked` and checks lazily instead (:func:`imgmw.em.fit_gmm`).
    """
    eps, tiny = torch.finfo(a.dtype).eps, torch.finfo(a.dtype).tiny
    levels = torch.arange(_MAX_JITTER_STEPS + 1, device=a.device).view(-1, *[1] * (a.dim() - 2))  # [9, 1…]
    with torch.no_grad():
        scale = _diag_scale(a)
        ladder, info = torch.linalg.cholesky_ex(add_to_diagonal(a.detach().unsqueeze(0), _jitter(scale, levels)))
        ok = info == 0  # [9, *B]
        level = ok.long().argmax(0)  # the first level that succeeds (0 when none does)
        failed = ~ok.any(0) | (~ok[0] & (scale < tiny / eps))
    if torch.is_grad_enabled() and a.requires_grad:
        chol = torch.linalg.cholesky_ex(add_to_diagonal(a, _jitter(_diag_scale(a), level)))[0]
    else:
        chol = ladder.gather(0, level.view(1, *level.shape, 1, 1).expand(1, *a.shape)).squeeze(0)
    return torch.where(failed[..., None, None], torch.nan, chol), failed


def cholesky_unchecked(a: Tensor) -> tuple[Tensor, Tensor]:
    """``(L, failed)`` for symmetric ``a [*B, D, D]`` with ONE ``cholesky_ex`` and no host synchronisation.

    ``failed [*B]`` (on ``a``'s device) marks the matrices LAPACK could not factorise (not numerically positive
    definite, or NaN); their factors are set to NaN, so that nothing computed from them can pass for a result.
    Elsewhere ``L`` equals :func:`safe_cholesky`'s factor bit for bit. The caller owns the check of ``failed``
    and the recovery (:func:`imgmw.em.fit_gmm` redoes the steps from the first failure with
    :func:`cholesky_jittered`'s factors).
    """
    chol, info = torch.linalg.cholesky_ex(a)
    failed = info > 0
    return torch.where(failed[..., None, None], torch.nan, chol), failed


def cholesky_inverse_transpose(chol: Tensor) -> Tensor:
    """``L⁻ᵀ`` for lower-triangular ``chol [*B, D, D]``: the upper-triangular precision Cholesky factor.

    With ``P = L⁻ᵀ`` one has ``Σ⁻¹ = P Pᵀ`` and ``‖(x − m)ᵀ P‖² = (x − m)ᵀ Σ⁻¹ (x − m)``.
    """
    eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device).expand_as(chol)
    return torch.linalg.solve_triangular(chol, eye, upper=False).mT


def log_det_from_cholesky(chol: Tensor) -> Tensor:
    """``log det(L Lᵀ) = 2 Σ_a log L_aa`` for ``chol [*B, D, D]``; returns ``[*B]``."""
    return 2.0 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)


def all_finite(x: Tensor) -> bool:
    """Whether every entry of ``x`` is finite, without an ``x``-sized temporary.

    ``torch.isfinite(x).all()`` builds boolean and absolute-value copies of ``x`` (0.6 GB for 500k patches of
    D=192 in float32), and so does a sum in another dtype. A sum in ``x``'s own dtype is finite exactly when
    every entry is, unless it overflows; only a non-finite sum is checked entry by entry, in chunks.
    """
    if not x.is_floating_point() or bool(torch.isfinite(x.sum())):
        return True
    flat = x.detach().reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(FINITE_CHUNK))
