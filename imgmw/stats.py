"""Additive sufficient statistics of a Gaussian mixture and the chunked E-step that produces them.

For responsibilities ``r_nk``, point weights ``ω_n`` (mask × sample weight) and per-component shifts
``c_k`` (the previous means), the statistics are

    s0_k = Σ_n ω_n r_nk,   s1_k = Σ_n ω_n r_nk (x_n − c_k),   s2_k = Σ_n ω_n r_nk (x_n − c_k)(x_n − c_k)ᵀ,

plus ``Σ_n ω_n log p(x_n)`` and ``Σ_n ω_n``. They add over chunks of points, over devices and over
repeated points, which is why chunking, masks, sample weights and all-reduce share one mechanism.
Shifting by the previous means keeps the covariance ``s2/s0 − δδᵀ`` (``δ = s1/s0``) free of the
cancellation that raw second moments suffer in float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .gmm import GMM, centred_log_prob

__all__ = ["SuffStats", "accumulate_stats", "e_step", "stats_from_resp", "chunk_bounds"]

# Elements of one [*B, K, n, D] temporary per chunk (4 MiB in float32): small enough to stay in cache
# and to be recycled by the allocator, large enough that per-chunk overhead is negligible.
CHUNK_ELEMENTS = 1 << 20


@dataclass
class SuffStats:
    """Sufficient statistics about shifts ``shift [*B, K, D]``.

    ``s0 [*B, K]``, ``s1 [*B, K, D]``, ``s2 [*B, K, D, D]``, ``log_lik [*B]`` (weighted sum of
    ``log p(x_n)`` under the parameters of the E-step), ``total [*B]`` (sum of point weights).
    """

    s0: Tensor
    s1: Tensor
    s2: Tensor
    log_lik: Tensor
    total: Tensor
    shift: Tensor

    def __add__(self, other: "SuffStats") -> "SuffStats":
        return SuffStats(self.s0 + other.s0, self.s1 + other.s1, self.s2 + other.s2,
                         self.log_lik + other.log_lik, self.total + other.total, self.shift)


def chunk_bounds(n: int, batch: int, k: int, d: int, chunk_size: int | None) -> list[tuple[int, int]]:
    """Split ``range(n)`` into chunks whose ``[batch, k, chunk, d]`` temporaries hold ~CHUNK_ELEMENTS."""
    if chunk_size is None:
        chunk_size = max(16, CHUNK_ELEMENTS // max(1, batch * k * d))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


def stats_from_resp(diff: Tensor, rw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(s0, s1, s2)`` from centred points ``diff [*B, K, n, D]`` and weighted responsibilities ``rw [*B, K, n]``."""
    s0 = rw.sum(-1)
    s1 = (rw.unsqueeze(-2) @ diff).squeeze(-2)
    s2 = (diff * rw.unsqueeze(-1)).mT @ diff
    return s0, s1, s2


def _e_chunk(gmm: GMM, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(diff [*B,K,n,D], log_resp [*B,K,n], log_norm [*B,n])`` for one chunk of points."""
    diff, logp = centred_log_prob(x, gmm.means, gmm.precision_cholesky, gmm.log_det_covariances)
    logp = logp + gmm.weights.log().unsqueeze(-1)
    log_norm = torch.logsumexp(logp, dim=-2)
    return diff, logp - log_norm.unsqueeze(-2), log_norm


def _point_weight_chunk(weight: Tensor | None, x: Tensor) -> Tensor:
    if weight is None:
        return torch.ones(x.shape[:-1], dtype=x.dtype, device=x.device)
    return weight


def accumulate_stats(gmm: GMM, x: Tensor, weight: Tensor | None = None,
                     chunk_size: int | None = None) -> SuffStats:
    """E-step fused with the accumulation of sufficient statistics, chunked over points.

    Args:
        gmm: current parameters, batch ``*B``.
        x: ``[*B, N, D]`` points (entries with zero weight must be finite; callers zero them).
        weight: ``[*B, N]`` non-negative point weights ``ω_n`` or ``None`` for all ones.
        chunk_size: points per chunk (default: temporaries of about 2²⁰ elements).

    Never stores responsibilities: memory is ``O(B·K·chunk·D + B·K·D²)`` beyond the inputs.
    """
    bshape, k, d = gmm.batch_shape, gmm.n_components, gmm.n_features
    shift = gmm.means
    out: SuffStats | None = None
    for lo, hi in chunk_bounds(x.shape[-2], math.prod(bshape), k, d, chunk_size):
        xc = x[..., lo:hi, :]
        wc = _point_weight_chunk(None if weight is None else weight[..., lo:hi], xc)
        diff, log_resp, log_norm = _e_chunk(gmm, xc)
        s0, s1, s2 = stats_from_resp(diff, log_resp.exp() * wc.unsqueeze(-2))
        part = SuffStats(s0, s1, s2, (log_norm * wc).sum(-1), wc.sum(-1), shift)
        out = part if out is None else out + part
    assert out is not None  # N >= 1 is validated by callers
    return out


def e_step(gmm: GMM, x: Tensor, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Responsibilities in the log domain.

    Args:
        gmm: parameters with batch ``*B``.
        x: ``[*B, N, D]`` points.

    Returns:
        ``(log_resp [*B, N, K], log_prob [*B, N])`` with ``log_resp_nk = log w_k + log N(x_n|m_k,Σ_k) −
        log p(x_n)`` and ``log_prob_n = log p(x_n)`` (log-sum-exp over components).
    """
    gmm._check_points(x)
    resp, norms = [], []
    for lo, hi in chunk_bounds(x.shape[-2], math.prod(gmm.batch_shape), gmm.n_components, gmm.n_features,
                               chunk_size):
        _, log_resp, log_norm = _e_chunk(gmm, x[..., lo:hi, :])
        resp.append(log_resp.transpose(-1, -2))
        norms.append(log_norm)
    return torch.cat(resp, dim=-2), torch.cat(norms, dim=-1)
