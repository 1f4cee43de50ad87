"""The batched Gaussian-mixture container.

A :class:`GMM` holds ``weights [*B, K]``, ``means [*B, K, D]`` and full ``covariances [*B, K, D, D]``
for any leading batch shape ``*B``. Derived quantities (Cholesky factors, precision Cholesky factors,
log-determinants) are computed on first use and cached; the container is immutable by convention, so
the cache never goes stale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .linalg import (all_finite, cholesky_inverse_transpose, cholesky_jittered, cholesky_unchecked,
                     log_det_from_cholesky, safe_cholesky)

__all__ = ["GMM", "centred_log_prob", "gaussian_log_prob"]

LOG_2PI = math.log(2.0 * math.pi)


def centred_log_prob(x: Tensor, means: Tensor, prec_chol: Tensor, log_det_cov: Tensor) -> tuple[Tensor, Tensor]:
    """Whitened centred data and Gaussian log-densities for ``x [*B, N, D]`` against ``K`` components.

    ``means [*B, K, D]``, ``prec_chol [*B, K, D, D]`` (``P_k = L_k⁻ᵀ``), ``log_det_cov [*B, K]``.
    Returns ``(y [*B, K, N, D], logp [*B, K, N])`` with ``y_nk = (x_n − m_k)ᵀ P_k`` (so that
    ``x_n − m_k = L_k y_nk``) and ``logp = −½ (D log 2π + log|Σ_k| + ‖y_nk‖²)``. Working on centred data
    avoids the cancellation of the expanded quadratic form. Temporaries are ``[*B, K, N, D]``: callers
    chunk over N.
    """
    y = (x.unsqueeze(-3) - means.unsqueeze(-2)) @ prec_chol
    maha = torch.linalg.vector_norm(y, dim=-1).square()
    logp = -0.5 * (maha + (x.shape[-1] * LOG_2PI) + log_det_cov.unsqueeze(-1))
    return y, logp


def gaussian_log_prob(x: Tensor, means: Tensor, prec_chol: Tensor, log_det_cov: Tensor) -> Tensor:
    """``log N(x_n | m_k, Σ_k)`` as ``[*B, N, K]``; arguments as in :func:`centred_log_prob`."""
    return centred_log_prob(x, means, prec_chol, log_det_cov)[1].transpose(-1, -2)


@dataclass(eq=False)
class GMM:
    """Batched Gaussian mixture with full covariances.

    Attributes:
        weights: ``[*B, K]`` mixture weights, non-negative, summing to one over ``K``.
        means: ``[*B, K, D]`` component means.
        covariances: ``[*B, K, D, D]`` symmetric positive-definite component covariances.

    Example:
        >>> g = GMM(torch.tensor([0.5, 0.5]), torch.zeros(2, 3), torch.eye(3).expand(2, 3, 3))
        >>> g.log_prob(torch.zeros(5, 3)).shape
        torch.Size([5])
    """

    weights: Tensor
    means: Tensor
    covariances: Tensor
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_cholesky(cls, weights: Tensor, means: Tensor, cholesky: Tensor) -> GMM:
        """The mixture with covariances ``L Lᵀ`` for lower-triangular ``cholesky [*B, K, D, D]``, keeping ``L`` as
        its Cholesky factor (no refactorisation, and gradients flow through ``L`` as given)."""
        gmm = cls(weights, means, cholesky @ cholesky.mT)
        gmm._cache["chol"] = cholesky
        return gmm

    def __post_init__(self) -> None:
        w, m, c = self.weights, self.means, self.covariances
        if m.dim() < 2:
            raise ValueError(f"GMM means must be [*B, K, D], got shape {tuple(m.shape)}")
        if w.shape != m.shape[:-1]:
            raise ValueError(
                f"GMM weights must be [*B, K] = {tuple(m.shape[:-1])} to match means {tuple(m.shape)}, "
                f"got {tuple(w.shape)}"
            )
        if c.shape != m.shape + m.shape[-1:]:
            raise ValueError(
                f"GMM covariances must be [*B, K, D, D] = {tuple(m.shape + m.shape[-1:])}, "
                f"got {tuple(c.shape)}"
            )
        if not (w.dtype == m.dtype == c.dtype) or not w.is_floating_point():
            raise ValueError(f"GMM tensors must share one floating dtype, got {w.dtype}, {m.dtype}, {c.dtype}")

    # ----------------------------------------------------------------- shape information
    @property
    def batch_shape(self) -> torch.Size:
        return self.means.shape[:-2]

    @property
    def n_components(self) -> int:
        return self.means.shape[-2]

    @property
    def n_features(self) -> int:
        return self.means.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    @property
    def device(self) -> torch.device:
        return self.means.device

    # ----------------------------------------------------------------- cached factors
    @property
    def cholesky(self) -> Tensor:
        """``[*B, K, D, D]`` lower factors ``L_k`` with ``Σ_k = L_k L_kᵀ`` (jitter if needed).

        Computed by :func:`imgmw.linalg.cholesky_jittered`, without reading the device: the factors of
        :func:`imgmw.linalg.safe_cholesky`, bit for bit. A covariance that no jitter repairs (NaN entries, numerically
        zero, strongly indefinite) gets a NaN factor, flagged by :attr:`cholesky_failed`; :meth:`check_cholesky`
        raises the error, and so do :meth:`log_prob`, :func:`imgmw.e_step`, :func:`imgmw.em_step` and
        :func:`imgmw.fit_gmm`, which read the device anyway.
        """
        if "chol" not in self._cache:
            self._cache["chol"], self._cache["chol_failed"] = cholesky_jittered(self.covariances)
        return self._cache["chol"]

    @property
    def cholesky_failed(self) -> Tensor:
        """``[*B, K]`` booleans (on the device): covariances whose factor :attr:`cholesky` could not compute."""
        _ = self.cholesky  # factorising sets the flag
        return self._cache.get("chol_failed", torch.zeros(self.weights.shape, dtype=torch.bool, device=self.device))

    def check_cholesky(self) -> GMM:
        """Raise :func:`imgmw.linalg.safe_cholesky`'s ``ValueError`` if :attr:`cholesky` failed for a covariance
        (one read of the device); returns ``self``."""
        if bool(self.cholesky_failed.any()):
            safe_cholesky(self.covariances, what="GMM covariances")
        return self

    def factorise_unchecked(self) -> tuple[GMM, Tensor]:
        """``(gmm, failed)``: this mixture with its Cholesky factors cached by :func:`cholesky_unchecked` (one
        factorisation instead of :attr:`cholesky`'s nine, no host synchronisation), or itself when factors are
        cached already (``failed``: their :attr:`cholesky_failed`).

        ``failed [*B, K]`` stays on the device; the returned mixture's factors are NaN where it is true. The
        caller must check ``failed`` before trusting anything computed from the returned mixture, and redo the
        computation from ``self`` (whose :attr:`cholesky` escalates jitter, :meth:`check_cholesky` raising when
        that fails) when any is true; ``self`` is not modified. :func:`imgmw.fit_gmm` does this once per fit
        instead of once per EM step.
        """
        if "chol" in self._cache:
            return self, self.cholesky_failed
        chol, failed = cholesky_unchecked(self.covariances)
        out = GMM(self.weights, self.means, self.covariances)
        out._cache["chol"] = chol
        return out, failed

    @property
    def precision_cholesky(self) -> Tensor:
        """``[*B, K, D, D]`` upper factors ``P_k = L_k⁻ᵀ`` with ``Σ_k⁻¹ = P_k P_kᵀ`` (sklearn's convention)."""
        if "prec_chol" not in self._cache:
            self._cache["prec_chol"] = cholesky_inverse_transpose(self.cholesky)
        return self._cache["prec_chol"]

    @property
    def log_det_covariances(self) -> Tensor:
        """``[*B, K]`` values of ``log det Σ_k``."""
        if "log_det" not in self._cache:
            self._cache["log_det"] = log_det_from_cholesky(self.cholesky)
        return self._cache["log_det"]

    # ----------------------------------------------------------------- densities
    def component_log_prob(self, x: Tensor) -> Tensor:
        """``log w_k + log N(x_n | m_k, Σ_k)`` for ``x [*B, N, D]``; returns ``[*B, N, K]``."""
        lp = gaussian_log_prob(x, self.means, self.precision_cholesky, self.log_det_covariances)
        return lp + self.weights.log().unsqueeze(-2)

    def log_prob(self, x: Tensor) -> Tensor:
        """Mixture log-density ``log Σ_k w_k N(x_n | m_k, Σ_k)`` for ``x [*B, N, D]``; returns ``[*B, N]``."""
        self.validate_points(x)
        self.check_cholesky()
        return torch.logsumexp(self.component_log_prob(x), dim=-1)

    def validate_points(self, x: Tensor) -> None:
        """ValueError unless ``x`` is ``[*B, N, D]`` with this mixture's ``D`` and finite values."""
        if x.dim() < 2 or x.shape[-1] != self.n_features:
            raise ValueError(f"points must be [*B, N, {self.n_features}], got shape {tuple(x.shape)}")
        if not all_finite(x):
            raise ValueError("points contain NaN or inf; a density of a non-finite point is not defined")

    # ----------------------------------------------------------------- sampling
    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``n`` points per batch element.

        Returns ``(x [*B, n, D], labels [*B, n])`` where ``labels`` are component indices. Deterministic
        for a given ``generator`` state.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.check_cholesky()
        bshape = self.batch_shape
        w = self.weights.detach().reshape(-1, self.n_components)
        labels = (torch.multinomial(w, n, replacement=True, generator=generator) if n > 0  # multinomial rejects n=0
                  else torch.zeros(w.shape[0], 0, dtype=torch.long, device=w.device)).reshape(*bshape, n)
        z = torch.randn(*bshape, n, self.n_features, dtype=self.dtype, device=self.device, generator=generator)
        idx = labels.unsqueeze(-1)
        mu = torch.take_along_dim(self.means, idx, dim=-2)  # [*B, n, D]
        chol = torch.take_along_dim(self.cholesky, idx.unsqueeze(-1), dim=-3)  # [*B, n, D, D]
        x = mu + (chol @ z.unsqueeze(-1)).squeeze(-1)
        return x, labels

    # ----------------------------------------------------------------- conversions
    def to(self, *args, **kwargs) -> GMM:
        """Move/cast all tensors like ``Tensor.to``."""
        return GMM(self.weights.to(*args, **kwargs), self.means.to(*args, **kwargs),
                   self.covariances.to(*args, **kwargs))

    def detach(self) -> GMM:
        """A copy whose tensors are cut from the autograd graph (cached factors kept, detached)."""
        out = GMM(self.weights.detach(), self.means.detach(), self.covariances.detach())
        out._cache = {k: v.detach() for k, v in self._cache.items()}
        return out

    def __getitem__(self, index) -> GMM:
        """Index the batch dimensions: ``gmm[i]`` is the ``i``-th mixture of a ``[B]``-batched GMM."""
        if not isinstance(index, tuple):
            index = (index,)
        if len(index) > len(self.batch_shape):
            raise IndexError(f"GMM has {len(self.batch_shape)} batch dims, got {len(index)} indices")
        return GMM(self.weights[index], self.means[index], self.covariances[index])

    @staticmethod
    def where(condition: Tensor, a: GMM, b: GMM) -> GMM:
        """Per batch element, ``a`` where ``condition [*B]`` is true and ``b`` elsewhere (like ``torch.where``)."""
        return GMM(torch.where(condition.unsqueeze(-1), a.weights, b.weights),
                   torch.where(condition[..., None, None], a.means, b.means),
                   torch.where(condition[..., None, None, None], a.covariances, b.covariances))

    @staticmethod
    def stack(gmms: list[GMM], dim: int = 0) -> GMM:
        """Stack GMMs of equal ``K`` and ``D`` along a new batch dimension ``dim``."""
        if dim < 0:
            raise ValueError("GMM.stack takes a non-negative batch dim")
        return GMM(torch.stack([g.weights for g in gmms], dim), torch.stack([g.means for g in gmms], dim),
                   torch.stack([g.covariances for g in gmms], dim))
