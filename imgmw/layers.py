"""EM as a neural operator: unrolled EM steps with learnable, structure-preserving residual corrections.

:class:`EMLayer` maps sets of points ``x [*B, N, D]`` to Gaussian mixtures in three stages:

- **encoder** (transform): the E-step, responsibilities ``r_nk ∝ α_k N(x_n | μ_k, Σ_k)`` in the log
  domain, fused with the sufficient statistics (:func:`imgmw.stats.accumulate_stats`);
- **operator core**: ``T`` unrolled EM steps ``θ⁺ = F(θ, X)`` (:func:`imgmw.em.m_step`), each followed
  (or only the last one, ``residual_every_step=False``) by a learned residual correction
  ``θ' = C_φ(θ⁺; θ, X)`` of the means, covariances and mixture logits;
- **decoder** (inverse transform): the mixture log-likelihood
  ``log p(x_n) = logsumexp_k (log α_k + log N(x_n | μ_k, Σ_k))``, summed over the valid points.

Training maximises the log-likelihood of each set under the mixture the layer produces for it:
``loss = −log_likelihood.mean()`` (:func:`nll_loss`; pass ``n_points`` for the per-point version, which
makes the loss scale independent of ``N`` and comparable across set sizes).

**Data frame.** Every set is standardised by its weighted mean ``c [*B, D]`` and per-feature standard
deviation ``s = sqrt(var + reg_covar) [*B, D]`` (:func:`data_frame`). The learned initialisation and the
MLP features live in that frame, so one set of weights serves data of any location and scale.

**Corrections.** With the EM step ``θ → θ⁺`` (``Δμ_k = μ⁺_k − μ_k``, ``Δℓ_k = log diag L⁺_k − log diag
L_k``, ``Δa_k = log α⁺_k − log α_k``), MLP outputs ``r`` and ``clip_b(v) = b·tanh(v/b)``:

    μ'_k = μ⁺_k + L⁺_k (MEAN_BOUND · tanh r_μ) + GAIN_BOUND · tanh(r_g) · Δμ_k
    L'_k = L⁺_k M_k,   M_k = diag(exp δ_k) + strictly_lower(LOWER_BOUND · tanh r_l),
           δ_k = clip_{2·LOG_DIAG_BOUND}(LOG_DIAG_BOUND · tanh r_d + GAIN_BOUND · tanh(r_h) · Δℓ_k)
    Σ'_k = L'_k L'_kᵀ + max(0, ε − λ_min(L'_k L'_kᵀ)) · I          (ε = reg_covar)
    α'   = softmax(log α⁺ + clip_{2·LOGIT_BOUND}(LOGIT_BOUND · tanh r_a + GAIN_BOUND · tanh(r_b) · Δa))

The mean correction is a bounded step in the component's own frame (at most ``MEAN_BOUND`` per
whitened coordinate) plus a learned over-/under-relaxation of the EM step (gain in
``[−GAIN_BOUND, GAIN_BOUND]``: EM acceleration). ``L⁺_k M_k`` is lower triangular with a positive
diagonal, so ``Σ'_k`` is symmetric positive definite by construction, each Cholesky diagonal changes by
at most a factor ``exp(2·LOG_DIAG_BOUND)``, and the eigenvalue floor keeps the M-step's guarantee
``λ_min(Σ'_k) ≥ ε`` (it is inactive, i.e. exactly zero, on an uncorrected EM covariance). With
``fixed_weights`` the weights are never corrected.

**Permutation equivariance.** The three correction MLPs (means, Cholesky, logits) are each shared
across components and fed per-component features, their mean over components, set-level scalars and an
attention summary over the other components, so permuting the initial components permutes every output.

**Identity at initialisation.** The last layer of every MLP starts at zero, so every ``tanh r = 0``,
``M_k = I`` and an untrained layer computes exactly ``T`` EM steps (:func:`imgmw.fit_gmm` with the same
initial parameters and ``tol=None``).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .deprecation import renamed_parameters
from .gmm import GMM
from .init import INIT_METHODS, init_gmm
from .linalg import add_to_diagonal
from .mstep import m_step
from .stats import accumulate_stats, chunk_bounds, e_step
from .validation import check_choice, check_points, check_reg_covar, point_weights

__all__ = ["EMLayer", "LAYER_INITS", "ComponentMLP", "data_frame", "apply_correction", "floor_eigenvalues",
           "responsibility_moments", "nll_loss", "n_mlp_features",
           "MEAN_BOUND", "LOG_DIAG_BOUND", "LOWER_BOUND", "LOGIT_BOUND", "GAIN_BOUND"]

LAYER_INITS = (*INIT_METHODS, "learned", "given")
"""Starts of :class:`EMLayer`: a data-dependent start of :func:`imgmw.init.init_gmm`, the learned fixed start
in the data frame, or an ``init`` GMM that every call passes."""

MEAN_BOUND = 1.0
"""Largest mean correction per whitened coordinate of the component (in units of its own std)."""
LOG_DIAG_BOUND = 1.0
"""Bound of the free change of ``log L_aa``; with the gain term the total is clipped at twice this."""
LOWER_BOUND = 0.5
"""Largest strictly-lower entry of ``M_k`` in ``L'_k = L⁺_k M_k`` (dimensionless: in the component's frame)."""
LOGIT_BOUND = 1.0
"""Bound of the free change of a mixture logit; with the gain term the total is clipped at twice this."""
GAIN_BOUND = 4.0
"""Largest |gain| on the EM step: the corrected step is between −3 and 5 times EM's own step."""
_FEATURE_CLIP = 5.0
"""Soft bound of the unbounded MLP features (ratios, moments) so outliers cannot saturate the MLPs."""


def n_mlp_features(d: int) -> int:
    """Width ``F = 12·D + 13`` of the per-component MLP input (see :class:`EMLayer`)."""
    per_component = 4 * d + 2
    return 2 * per_component + 3 + (2 * d + 2) + (d + 3) + (d + 1)


@renamed_parameters(weight="sample_weight")
def data_frame(x: Tensor, sample_weight: Tensor | None, reg_covar: float) -> tuple[Tensor, Tensor]:
    """Weighted mean ``c [*B, D]`` and scale ``s = sqrt(var + reg_covar) [*B, D]`` of ``x [*B, N, D]``.

    ``sample_weight [*B, N]`` are point weights (``None``: all ones). ``s`` is floored at ``sqrt(eps)`` of the
    dtype so that a constant feature with ``reg_covar = 0`` still gives a finite frame.
    """
    w = torch.ones(x.shape[:-1], dtype=x.dtype, device=x.device) if sample_weight is None else sample_weight
    w = (w / w.sum(-1, keepdim=True)).unsqueeze(-1)
    centre = (w * x).sum(-2)
    var = (w * (x - centre.unsqueeze(-2)).square()).sum(-2)
    scale = (var + reg_covar).sqrt().clamp_min(math.sqrt(torch.finfo(x.dtype).eps))
    return centre, scale


def floor_eigenvalues(cov: Tensor, eps: float) -> Tensor:
    """``Σ + max(0, ε − λ_min(Σ)) · I`` for symmetric ``cov [*B, D, D]``: guarantees ``λ_min ≥ ε``.

    The shift is exactly zero when ``Σ`` already satisfies the floor, so EM covariances pass unchanged.
    """
    lam_min = torch.linalg.eigvalsh(cov)[..., 0]
    return add_to_diagonal(cov, (eps - lam_min).clamp_min(0.0))


def _soft_clip(v: Tensor, bound: float) -> Tensor:
    """``bound · tanh(v / bound)``: identity near 0, never beyond ``±bound``."""
    return bound * torch.tanh(v / bound)


def _strictly_lower(values: Tensor, d: int) -> Tensor:
    """Scatter ``values [*B, d(d−1)/2]`` row-major into the strictly lower triangle of ``[*B, d, d]``."""
    rows, cols = torch.tril_indices(d, d, offset=-1, device=values.device)
    out = values.new_zeros(*values.shape[:-1], d, d)
    out[..., rows, cols] = values
    return out


def _log_diag(chol: Tensor) -> Tensor:
    """``log L_aa`` as ``[*B, K, D]`` for Cholesky factors ``[*B, K, D, D]``."""
    return chol.diagonal(dim1=-2, dim2=-1).log()


def apply_correction(gmm: GMM, prev: GMM, raw_mean: Tensor, raw_chol: Tensor, raw_logit: Tensor | None,
                     *, reg_covar: float) -> GMM:
    """Bounded residual correction of the EM output ``gmm`` = θ⁺ (formulas in the module docstring).

    Args:
        gmm: EM output θ⁺, batch ``*B``, ``K`` components in ``D`` dims.
        prev: parameters θ before the EM step (gives the step Δ that the gains scale).
        raw_mean: ``[*B, K, D + 1]`` MLP outputs: ``r_μ`` then the gain logit ``r_g``.
        raw_chol: ``[*B, K, D + D(D−1)/2 + 1]``: ``r_d``, the strictly lower ``r_l`` (row-major), ``r_h``.
        raw_logit: ``[*B, K, 2]`` (``r_a``, ``r_b``), or ``None`` to keep the weights.
        reg_covar: eigenvalue floor ``ε`` of the corrected covariances.

    Returns:
        The corrected :class:`GMM`; its covariances are SPD with ``λ_min ≥ ε`` for any finite outputs.
    """
    d = gmm.n_features
    chol = gmm.cholesky
    local = (chol @ (MEAN_BOUND * torch.tanh(raw_mean[..., :d])).unsqueeze(-1)).squeeze(-1)
    means = gmm.means + local + GAIN_BOUND * torch.tanh(raw_mean[..., d:]) * (gmm.means - prev.means)
    log_diag = _soft_clip(LOG_DIAG_BOUND * torch.tanh(raw_chol[..., :d]) + GAIN_BOUND * torch.tanh(raw_chol[..., -1:])
                          * (_log_diag(chol) - _log_diag(prev.cholesky)), 2 * LOG_DIAG_BOUND)
    mult = torch.diag_embed(log_diag.exp()) + _strictly_lower(LOWER_BOUND * torch.tanh(raw_chol[..., d:-1]), d)
    new_chol = chol @ mult
    cov = floor_eigenvalues(new_chol @ new_chol.mT, reg_covar)
    weights = gmm.weights
    if raw_logit is not None:
        log_w = gmm.weights.log()
        step = LOGIT_BOUND * torch.tanh(raw_logit[..., 0]) + GAIN_BOUND * torch.tanh(raw_logit[..., 1]) * (
            log_w - prev.weights.log())
        weights = torch.softmax(log_w + _soft_clip(step, 2 * LOGIT_BOUND), dim=-1)
    return GMM(weights, means, cov)


@renamed_parameters(weight="sample_weight")
def responsibility_moments(prev: GMM, new: GMM, x: Tensor, sample_weight: Tensor | None,
                           chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Shape diagnostics of each component's points: skewness vector and excess kurtosis.

    With responsibilities ``r_nk`` under ``prev`` (:func:`imgmw.stats.e_step`), point weights ``ω_n`` and
    whitened residuals ``z_nk = P⁺_kᵀ (x_n − μ⁺_k)`` under ``new`` (``P⁺ = L⁺⁻ᵀ``), ``N_k = Σ_n ω_n r_nk``:

        skew_k = Σ_n ω_n r_nk ‖z_nk‖² z_nk / ((D + 2) N_k)           [*B, K, D]
        kurt_k = Σ_n ω_n r_nk ‖z_nk‖⁴ / (D (D + 2) N_k) − 1           [*B, K]

    Both vanish for Gaussian data; a component spread over two clusters has ``kurt < 0`` and a skewness
    pointing at the heavier cluster. Chunked over points; ``x [*B, N, D]``, ``sample_weight [*B, N]`` or None.
    """
    k, d = new.n_components, new.n_features
    skew = x.new_zeros(*new.batch_shape, k, d)
    fourth = x.new_zeros(*new.batch_shape, k)
    mass = x.new_zeros(*new.batch_shape, k)
    for lo, hi in chunk_bounds(x.shape[-2], math.prod(new.batch_shape), k, d, chunk_size):
        xc = x[..., lo:hi, :]
        resp = e_step(prev, xc)[0].exp().mT  # [*B, K, n]
        if sample_weight is not None:
            resp = resp * sample_weight[..., lo:hi].unsqueeze(-2)
        z = (xc.unsqueeze(-3) - new.means.unsqueeze(-2)) @ new.precision_cholesky  # [*B, K, n, D]
        rm2 = resp * z.square().sum(-1)
        skew = skew + (rm2.unsqueeze(-2) @ z).squeeze(-2)
        fourth = fourth + (rm2 * z.square().sum(-1)).sum(-1)
        mass = mass + resp.sum(-1)
    mass = mass + 10 * torch.finfo(x.dtype).eps
    return skew / ((d + 2) * mass.unsqueeze(-1)), fourth / (d * (d + 2) * mass) - 1.0


def _pair_features(means: Tensor, log_diag: Tensor, log_w: Tensor, centre: Tensor, scale: Tensor) -> Tensor:
    """Attention summary of the other components, ``[*B, K, D + 3]``.

    In the data frame (``u_k = (μ_k − c)/s``), component ``k`` attends to ``j ≠ k`` with weights
    ``softmax_j(−‖u_j − u_k‖²)`` and receives the weighted ``u_j − u_k``, ``log α_j − log α_k`` and the
    difference of mean log Cholesky diagonals, plus ``log min_j ‖u_j − u_k‖²``.
    """
    k = means.shape[-2]
    u = (means - centre.unsqueeze(-2)) / scale.unsqueeze(-2)
    diff = u.unsqueeze(-3) - u.unsqueeze(-2)  # [*B, K, K, D]: entry (k, j) is u_j − u_k
    dist2 = diff.square().sum(-1) + 1e4 * torch.eye(k, dtype=means.dtype, device=means.device)
    att = torch.softmax(-dist2, dim=-1)
    size = log_diag.mean(-1)
    other = torch.cat([diff, (log_w.unsqueeze(-2) - log_w.unsqueeze(-1)).unsqueeze(-1),
                       (size.unsqueeze(-2) - size.unsqueeze(-1)).unsqueeze(-1)], dim=-1)
    nearest = dist2.min(-1).values.clamp_min(torch.finfo(means.dtype).tiny).log()
    return torch.cat([(att.unsqueeze(-1) * other).sum(-2), nearest.unsqueeze(-1)], dim=-1)


class ComponentMLP(nn.Module):
    """One MLP applied to every component: ``[*B, K, F] → [*B, K, out]``, last layer initialised at zero.

    Two hidden layers of width ``hidden`` with SiLU activations. Sharing the weights over ``K`` makes
    the map permutation-equivariant over components; the zero last layer makes its initial output 0.
    """

    def __init__(self, n_in: int, n_out: int, hidden: int) -> None:
        super().__init__()
        last = nn.Linear(hidden, n_out)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), last)

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)


@dataclass
class _Trace:
    """What the operator remembers between steps: the previous EM step and log-likelihood."""

    step_mean: Tensor | None = None  # [*B, K, D] previous Δμ / s
    step_log_diag: Tensor | None = None  # [*B, K, D] previous Δℓ
    log_lik: Tensor | None = None  # [*B] previous per-point, per-dimension log-likelihood in the frame


class EMLayer(nn.Module):
    """EM as a neural operator: ``T`` unrolled EM steps with learnable residual corrections.

    Args:
        n_components: ``K ≥ 1``.
        n_features: ``D ≥ 1`` (the MLP input sizes depend on it).
        n_iter: number of unrolled EM steps ``T ≥ 1``.
        residual: learn corrections; ``False`` gives plain EM (from the layer's start).
        init: the start of the EM steps (one of ``LAYER_INITS``). Default ``"kmeans++"``: a seeded k-means++
            start computed from each set (without gradient, from ``generator``), so that the untrained layer
            is plain EM from k-means++ and training only has to improve on it. ``"kmeans"``, ``"random"``,
            ``"random_from_data"``: the other starts of :func:`imgmw.init.init_gmm`. ``"learned"``: a learned
            start in the data frame, the same for every set: means ``μ⁰_k = c + s ⊙ m_k``, Cholesky factors
            ``L⁰_k = diag(s) · U_k`` with ``U_k`` lower triangular, diagonal ``exp(l_k)`` and free strictly lower
            part, weights ``softmax(a)``; parameters ``m [K, D]`` (drawn ``N(0, 1)`` from torch's global
            generator), ``l`` and the lower part 0 (so ``Σ⁰_k = diag(s²) + ε I``), ``a = 0``. ``"given"``: every
            call passes ``init=`` to :meth:`forward`. An ``init`` passed to :meth:`forward` always takes
            precedence.
        generator: ``torch.Generator`` of the random starts.
        learn_init: deprecated; ``True`` is ``init="learned"``, ``False`` is ``init="given"``.
        residual_every_step: correct after every EM step (``True``) or only after the last one.
        hidden: width of the hidden layers of the correction MLPs.
        reg_covar: ``ε ≥ 0`` of the M-step and floor of the corrected covariances' eigenvalues.
        fixed_weights: keep the initial weights (EM's fixed-weights variant; no logit corrections).

    MLP input per component ``k`` after the EM step ``θ → θ⁺`` at step ``t`` (``F = 12·D + 13``):

    - own state: ``(μ⁺_k − c)/s``, ``Δμ_k/s``, ``log diag L⁺_k − log s``, ``Δℓ_k``, ``log α⁺_k``, ``N_k/N``;
    - the mean of those over components (pooled context);
    - set scalars: ``(t+1)/T``, the mean log-likelihood per point and dimension in the data frame
      ``(ℓ_t + Σ_d log s_d)/D`` under θ, and its change since the previous step;
    - history: the previous step's ``Δμ_k/s`` and ``Δℓ_k``, the ratio ``‖Δμ_k‖/‖Δμ_k^{prev}‖`` and their
      cosine (the local contraction rate that EM extrapolation needs; zeros at the first step);
    - other components: :func:`_pair_features` (attention over ``j ≠ k``);
    - data shape: :func:`responsibility_moments` (skewness vector and excess kurtosis).

    Cost per step: two passes over the points (the EM step and the moments), both chunked over ``N``.

    Example:
        >>> layer = EMLayer(3, 2, n_iter=3)
        >>> gmm, log_resp, ll = layer(torch.randn(8, 100, 2))
        >>> loss = nll_loss(ll, n_points=100); loss.backward()
    """

    def __init__(self, n_components: int, n_features: int, n_iter: int, *, residual: bool = True,
                 init: str = "kmeans++", residual_every_step: bool = True, hidden: int = 64,
                 reg_covar: float = 1e-6, fixed_weights: bool = False, generator: torch.Generator | None = None,
                 learn_init: bool | None = None) -> None:
        super().__init__()
        if learn_init is not None:
            warnings.warn("EMLayer(learn_init=...) is deprecated: use init='learned' (True) or init='given' (False)",
                          DeprecationWarning, stacklevel=2)
            init = "learned" if learn_init else "given"
        check_choice("init", init, LAYER_INITS)
        for name, value in (("n_components", n_components), ("n_features", n_features), ("n_iter", n_iter),
                            ("hidden", hidden)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.n_components = n_components
        self.n_features = n_features
        self.n_iter = n_iter
        self.residual = residual
        self.init = init
        self.generator = generator
        self.residual_every_step = residual_every_step
        self.reg_covar = check_reg_covar(reg_covar)
        self.fixed_weights = fixed_weights
        k, d = n_components, n_features
        n_lower = d * (d - 1) // 2
        if init == "learned":
            self.init_means = nn.Parameter(torch.randn(k, d))
            self.init_chol = nn.Parameter(torch.zeros(k, d + n_lower))
            self.init_logits = nn.Parameter(torch.zeros(k))
        if residual:
            n_in = n_mlp_features(d)
            self.mean_mlp = ComponentMLP(n_in, d + 1, hidden)
            self.chol_mlp = ComponentMLP(n_in, d + n_lower + 1, hidden)
            self.logit_mlp = None if fixed_weights else ComponentMLP(n_in, 2, hidden)

    def extra_repr(self) -> str:
        return (f"n_components={self.n_components}, n_features={self.n_features}, n_iter={self.n_iter}, "
                f"residual={self.residual}, init={self.init!r}, "
                f"residual_every_step={self.residual_every_step}, reg_covar={self.reg_covar}, "
                f"fixed_weights={self.fixed_weights}")

    # ----------------------------------------------------------------- initialisation and checks
    def initial_gmm(self, x: Tensor, mask: Tensor | None = None) -> GMM:
        """The layer's start for ``x [*B, N, D]`` (see ``init``), batch ``*B``."""
        x, weight = self._prepare(x, mask)
        return self._start(x, weight, data_frame(x, weight, self.reg_covar))

    def _start(self, x: Tensor, weight: Tensor | None, frame: tuple[Tensor, Tensor]) -> GMM:
        if self.init == "learned":
            return self._learned_init(*frame)
        if self.init == "given":
            raise ValueError("EMLayer(init='given') needs init=GMM(...) in every call, e.g. from imgmw.init.init_gmm")
        start = init_gmm(x.detach(), self.n_components, self.init,
                         sample_weight=None if weight is None else weight.detach(), reg_covar=self.reg_covar,
                         generator=self.generator)
        if self.fixed_weights:  # as fit_gmm: a computed start of the fixed-weights variant has uniform weights
            start = GMM(torch.full_like(start.weights, 1.0 / self.n_components), start.means, start.covariances)
        return start

    def _learned_init(self, centre: Tensor, scale: Tensor) -> GMM:
        d = self.n_features
        means = centre.unsqueeze(-2) + scale.unsqueeze(-2) * self.init_means
        unit = torch.diag_embed(self.init_chol[:, :d].exp()) + _strictly_lower(self.init_chol[:, d:], d)
        chol = scale.unsqueeze(-1).unsqueeze(-3) * unit  # diag(s) · U_k, [*B, K, D, D]
        cov = add_to_diagonal(chol @ chol.mT, self.reg_covar)
        weights = torch.softmax(self.init_logits, dim=-1).expand(*centre.shape[:-1], self.n_components)
        return GMM(weights, means, cov)

    def _prepare(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        check_points(x)
        if x.shape[-1] != self.n_features:
            raise ValueError(f"x must be [*B, N, {self.n_features}] for this layer, got shape {tuple(x.shape)}")
        dtypes = {p.dtype for p in self.parameters()}
        if dtypes and dtypes != {x.dtype}:
            raise ValueError(f"x has dtype {x.dtype} but the layer's parameters are {sorted(map(str, dtypes))}; "
                             f"convert one of them, e.g. layer.to({x.dtype})")
        return point_weights(x, mask, None, self.n_components)

    def _check_init(self, init: GMM, x: Tensor) -> None:
        expected = (*x.shape[:-2], self.n_components, self.n_features)
        if tuple(init.means.shape) != expected or init.dtype != x.dtype or init.device != x.device:
            raise ValueError(f"init must be a GMM with means of shape {expected}, dtype {x.dtype} and device "
                             f"{x.device}; got {tuple(init.means.shape)}, {init.dtype}, {init.device}")

    # ----------------------------------------------------------------- operator core
    def _features(self, prev: GMM, new: GMM, x: Tensor, weight: Tensor | None, frame: tuple[Tensor, Tensor],
                  mass: Tensor, set_scalars: Tensor, history: Tensor) -> Tensor:
        """Per-component MLP input ``[*B, K, F]`` (see the class docstring)."""
        centre, scale = frame
        c, s = centre.unsqueeze(-2), scale.unsqueeze(-2)
        log_diag = _log_diag(new.cholesky)
        own = torch.cat([(new.means - c) / s, (new.means - prev.means) / s, log_diag - s.log(),
                         log_diag - _log_diag(prev.cholesky), new.weights.log().unsqueeze(-1),
                         mass.unsqueeze(-1)], dim=-1)
        skew, kurt = responsibility_moments(prev, new, x, weight)
        glob = set_scalars.unsqueeze(-2).expand(*own.shape[:-1], set_scalars.shape[-1])
        return torch.cat([own, own.mean(-2, keepdim=True).expand_as(own), glob, history,
                          _pair_features(new.means, log_diag, new.weights.log(), centre, scale),
                          _soft_clip(torch.cat([skew, kurt.unsqueeze(-1)], dim=-1), _FEATURE_CLIP)], dim=-1)

    def _history(self, prev: GMM, new: GMM, scale: Tensor, trace: _Trace) -> Tensor:
        """History features ``[*B, K, 2D + 2]``; updates ``trace`` with this step."""
        step_mean = (new.means - prev.means) / scale.unsqueeze(-2)
        step_log_diag = _log_diag(new.cholesky) - _log_diag(prev.cholesky)
        if trace.step_mean is None or trace.step_log_diag is None:
            out = torch.zeros(*step_mean.shape[:-1], 2 * self.n_features + 2, dtype=scale.dtype,
                              device=scale.device)
        else:
            tiny = torch.finfo(scale.dtype).eps
            now = (step_mean.square().sum(-1) + tiny).sqrt()
            before = (trace.step_mean.square().sum(-1) + tiny).sqrt()
            ratio = _soft_clip(now / before, _FEATURE_CLIP)
            cosine = (step_mean * trace.step_mean).sum(-1) / (now * before)
            out = torch.cat([trace.step_mean, trace.step_log_diag, ratio.unsqueeze(-1), cosine.unsqueeze(-1)], -1)
        trace.step_mean, trace.step_log_diag = step_mean, step_log_diag
        return out

    def _correct(self, prev: GMM, new: GMM, x: Tensor, weight: Tensor | None, frame: tuple[Tensor, Tensor],
                 mass: Tensor, set_scalars: Tensor, history: Tensor) -> GMM:
        feats = self._features(prev, new, x, weight, frame, mass, set_scalars, history)
        raw_logit = None if self.logit_mlp is None else self.logit_mlp(feats)
        return apply_correction(new, prev, self.mean_mlp(feats), self.chol_mlp(feats), raw_logit,
                                reg_covar=self.reg_covar)

    def _step(self, gmm: GMM, x: Tensor, weight: Tensor | None, frame: tuple[Tensor, Tensor], t: int,
              trace: _Trace) -> GMM:
        """One EM step from ``gmm``, then (if due) the learned correction."""
        stats = accumulate_stats(gmm, x, weight)
        new = m_step(stats, gmm, reg_covar=self.reg_covar, fixed_weights=self.fixed_weights)
        if not self.residual:
            return new
        history = self._history(gmm, new, frame[1], trace)
        log_lik = (stats.log_lik / stats.total + frame[1].log().sum(-1)) / self.n_features
        gain = torch.zeros_like(log_lik) if trace.log_lik is None else log_lik - trace.log_lik
        trace.log_lik = log_lik
        if not (self.residual_every_step or t == self.n_iter - 1):
            return new
        set_scalars = torch.stack([torch.full_like(log_lik, (t + 1) / self.n_iter), log_lik, gain], dim=-1)
        mass = stats.s0 / stats.total.unsqueeze(-1)
        return self._correct(gmm, new, x, weight, frame, mass, set_scalars, history)

    def forward(self, x: Tensor, mask: Tensor | None = None, init: GMM | None = None
                ) -> tuple[GMM, Tensor, Tensor]:
        """Run the operator on sets ``x [*B, N, D]``.

        Args:
            x: points; ``mask [*B, N]`` (booleans) excludes points exactly (at least ``K`` valid per set).
            init: initial mixture with batch ``*B`` (e.g. from :func:`imgmw.init.init_gmm`); required with
                ``init="given"``, otherwise it replaces the layer's own start.

        Returns:
            ``(gmm, log_resp [*B, N, K], log_likelihood [*B])``: the refined mixture, the log-
            responsibilities under it (rows of masked points are computed on zeroed points and carry no
            meaning) and ``Σ_n log p(x_n)`` over the valid points.
        """
        x, weight = self._prepare(x, mask)
        frame = data_frame(x, weight, self.reg_covar)
        if init is not None:
            self._check_init(init, x)
            gmm = init
        else:
            gmm = self._start(x, weight, frame)
        trace = _Trace()
        for t in range(self.n_iter):
            gmm = self._step(gmm, x, weight, frame, t, trace)
        log_resp, log_prob = e_step(gmm, x)
        log_lik = (log_prob if weight is None else log_prob * weight).sum(-1)
        return gmm, log_resp, log_lik


def nll_loss(log_likelihood: Tensor, n_points: Tensor | int | None = None) -> Tensor:
    """Negative mean log-likelihood ``−mean_b ℓ_b`` of the layer's ``log_likelihood [*B]``.

    With ``n_points`` (an int or ``[*B]`` counts of valid points) the loss is per point,
    ``−mean_b ℓ_b / N_b``: same minimiser for equal-size sets, but a scale independent of ``N``.
    """
    if n_points is not None:
        log_likelihood = log_likelihood / n_points
    return -log_likelihood.mean()
