"""Small batched linear-algebra helpers with the numerical safeguards imgmw relies on.

Every function works on leading batch dimensions ``*B`` and keeps autograd intact.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "symmetrize",
    "safe_cholesky",
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


def safe_cholesky(a: Tensor, *, what: str = "covariance") -> Tensor:
    """Lower Cholesky factor ``L`` with ``A = L Lᵀ`` for symmetric ``a [*B, D, D]``, escalating jitter.

    Matrices that are not numerically positive definite get ``ε·s·I`` added, where ``s`` is the mean
    diagonal magnitude of that matrix and ``ε`` grows tenfold from the dtype's machine epsilon (at most
    eight steps, i.e. up to ``1e8·eps·s``). Only the failing matrices are touched, so well-conditioned
    inputs give exactly ``torch.linalg.cholesky``'s result. Raises ``ValueError`` naming ``what`` if a
    matrix is still not positive definite (non-finite entries, or strongly indefinite input) or is
    numerically zero (no scale to make a jitter relative to).
    """
    chol, info = torch.linalg.cholesky_ex(a)
    if not bool((info > 0).any()):
        return chol
    eps = torch.finfo(a.dtype).eps
    scale = a.diagonal(dim1=-2, dim2=-1).abs().mean(-1)
    failed = info > 0
    if bool((failed & (scale < torch.finfo(a.dtype).tiny / eps)).any()):
        raise ValueError(
            f"{what}: a matrix is numerically zero (a component collapsed onto a single point), so no "
            "relative jitter can make it positive definite; use reg_covar > 0"
        )
    jitter = torch.zeros_like(scale)
    for step in range(_MAX_JITTER_STEPS):
        jitter = torch.where(failed, scale * eps * 10.0 ** (step + 1), jitter)
        chol, info = torch.linalg.cholesky_ex(add_to_diagonal(a, jitter))
        failed = info > 0
        if not bool(failed.any()):
            return chol
    bad = int(failed.sum())
    raise ValueError(
        f"{what}: {bad} matrix/matrices are not positive definite even with jitter "
        f"{float(jitter.max()):.3g}; check for NaN/inf values or increase reg_covar"
    )


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
