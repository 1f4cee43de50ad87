"""The M-step and the EM map: new mixture parameters from sufficient statistics.

``m_step`` turns the additive statistics of :mod:`imgmw.stats` into parameters,

    w_k = s0_k / Σ_j s0_j,   m_k = c_k + s1_k / s0_k,   Σ_k = s2_k / s0_k − δ_k δ_kᵀ + ε_r I,

with ``δ_k = s1_k / s0_k`` and ``c_k`` the previous means; ``em_map`` is one whole EM step (E-step fused with
the statistics, then the M-step). Both sit below the fit (:mod:`imgmw.em`), the initialisations
(:mod:`imgmw.init`, whose k-means++ ends with an M-step) and the implicit gradient (:mod:`imgmw.implicit`), so
that imports run one way: ``stats → distributed → mstep → init → em``, ``mstep → implicit → em``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .deprecation import renamed_parameters
from .gmm import GMM
from .distributed import reduce_stats
from .linalg import add_to_diagonal, symmetrize
from .stats import QuadFeatures, SuffStats, WhitenedFeatures, Workspace, accumulate_stats

__all__ = ["m_step", "em_map"]


def m_step(stats: SuffStats, prev: GMM, *, reg_covar: float = 1e-6, fixed_weights: bool = False) -> GMM:
    """New parameters from sufficient statistics (see the module docstring).

    ``prev`` supplies the shift's meaning (``stats.shift`` are its means) and the parameters that a
    component with (numerically) no mass keeps. ``fixed_weights`` keeps ``prev.weights`` (Algorithm 2).
    Statistics come from :func:`imgmw.stats.accumulate_stats` (chunked, as the fit does) or, from given
    responsibilities, :func:`imgmw.stats.responsibility_stats`.
    """
    dtype = stats.s0.dtype
    eps = torch.finfo(dtype).eps
    nk = stats.s0 + 10 * eps  # the same offset as scikit-learn, so weights never vanish
    mean_mass = stats.total / stats.s0.shape[-1]
    empty = stats.s0 <= 10 * eps * mean_mass.unsqueeze(-1)
    delta = stats.s1 / nk.unsqueeze(-1)
    means = stats.shift + delta
    cov = stats.s2 / nk[..., None, None] - delta.unsqueeze(-1) * delta.unsqueeze(-2)
    cov = add_to_diagonal(symmetrize(cov), reg_covar)
    means = torch.where(empty.unsqueeze(-1), prev.means, means)
    cov = torch.where(empty[..., None, None], prev.covariances, cov)
    weights = prev.weights if fixed_weights else nk / nk.sum(-1, keepdim=True)
    return GMM(weights, means, cov)


@renamed_parameters(weight="sample_weight")
def em_map(gmm: GMM, x: Tensor, sample_weight: Tensor | None, reg_covar: float, fixed_weights: bool,
           chunk_size: int | None = None, features: QuadFeatures | WhitenedFeatures | None = None,
           process_group=None, workspace: Workspace | None = None) -> tuple[GMM, Tensor]:
    """One EM step ``θ' = F(θ, X)`` on points ``x [*B, N, D]`` with point weights ``sample_weight [*B, N]`` (or
    ``None``), without input checks: the map that :func:`imgmw.fit_gmm` iterates and whose fixed point
    :mod:`imgmw.implicit` differentiates. Returns ``(F(θ, X), mean log-likelihood under θ [*B])``
    (``features``: the fit's cached features of ``x``, see :func:`imgmw.stats.point_features`;
    ``process_group``: ``x`` is this rank's shard and the statistics are summed over the group,
    :mod:`imgmw.distributed`; ``workspace``: the fit's E-step scratch, :class:`imgmw.stats.Workspace`).

    Neither the E-step, nor the M-step, nor :attr:`imgmw.gmm.GMM.cholesky` reads the device."""
    stats = reduce_stats(accumulate_stats(gmm, x, sample_weight, chunk_size, features, workspace), process_group)
    return m_step(stats, gmm, reg_covar=reg_covar, fixed_weights=fixed_weights), stats.log_lik / stats.total
