"""Warm-started EM that keeps fitting the data: the paper's Algorithm 3 plus a fit-keeping policy.

Inside an optimisation loop the points ``X_t`` move a little at every step. The paper's warm start
(Algorithm 3) does **one** EM step per optimiser step from the previous step's detached parameters
``θ_{t−1}`` and differentiates through it: ``θ_t = F(θ_{t−1}, X_t)``. That is cheap, but measured on the
colour flows the parameters then stop describing the points: the flow moves points faster than one EM
step per iteration follows them (continuing EM from the final ``θ`` raised the mean log-likelihood from
3.30 to 4.01 nats per colour), components with a fixed weight ``1/K`` kept as little as 0 % of the
mass, and the loss ``MW2²(θ_t, ν)`` reported convergence (3e-4) while a fresh fit of the moved points was
0.054 from the target.

:class:`FitPolicy` repairs this at each call, before the differentiable step, without gradient:

1. **refine** — ``max_refine`` EM steps from the stored ``θ`` on the current points; a batch element stops
   changing once a step gains less than ``refine_tol`` nats of mean log-likelihood per point;
2. **re-seed** — a component whose responsibility mass ``s0_k / Σ s0`` falls below ``min_mass`` times
   its fixed weight, or whose learned weight falls below ``min_weight / K``, is replaced by one half of
   the component with the most mass, split along its principal axis (:func:`split_component`). With
   fixed weights a starved component still weighs ``1/K`` in the loss, which is how the loss stops
   describing the data; with learned weights a light component weighs little, and on the colour pairs
   re-seeding (``min_weight`` 0.01 to 0.25) fired at 85–99 of 100 steps at K=64 without a measurable
   gain, so it is off by default there;
3. **refit** — every ``check_every`` calls a fresh fit (k-means++, at most ``refit_iter`` steps) of the current
   points is computed and adopted where its mean log-likelihood beats the stored ``θ``'s by more than
   ``switch_margin`` nats per point: the warm fit cannot stay in a worse EM optimum than a fresh fit
   would find.

The differentiable step ``F(θ, X_t)`` is then taken from the repaired ``θ``; gradients still flow
through that one step only (memory and backward cost of Algorithm 3). ``policy=None`` is the plain
Algorithm 3. Defaults were chosen on the bundled colour pairs and texture exemplars
(``benchmarks/bench_flow.py``); the counts of what the policy did are in :attr:`WarmStartEM.diagnostics`.

Stages 1 and 2 read nothing on the host: converged batch elements are frozen with :meth:`GMM.where` instead
of ending the loop (so refining always takes ``max_refine`` E-steps), the split of stage 2 is computed at
every call and kept where a component starved (one ``D×D`` eigendecomposition per call: 0.2 ms at ``D = 48``
on one CPU thread, about 2 % of a texture step), and the counters that depend on the data stay 0-d device
tensors (read when :meth:`FitDiagnostics.as_dict` is called). A call between two fresh-fit checks therefore
adds no host synchronisation to the EM step.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .em import fit_gmm
from .gmm import GMM
from .mstep import m_step
from .distributed import check_process_group, global_stats
from .validation import check_points, check_reg_covar, point_weights

__all__ = ["FitPolicy", "FitDiagnostics", "WarmStartEM", "split_component"]


@dataclass(frozen=True)
class FitPolicy:
    """How :class:`WarmStartEM` keeps its parameters describing the current points (module docstring).

    Attributes:
        max_refine: extra EM steps (no gradient) per call; 0 disables refining.
        refine_tol: a batch element's refining stops once a step gains less than this mean log-likelihood
            (nats per point).
        min_mass: re-seed threshold with fixed weights: responsibility mass below ``min_mass × weight``;
            0 disables it.
        min_weight: re-seed threshold with learned weights: weight below ``min_weight / K``; 0 disables it.
        check_every: calls between fresh-fit comparisons; 0 disables them.
        refit_iter: EM steps of each fresh fit (k-means++ start) at most; it stops earlier once a step gains
            less than ``refine_tol``.
        switch_margin: the fresh fit is adopted when it beats the stored fit by more than this mean
            log-likelihood (nats per point).
    """

    max_refine: int = 0
    refine_tol: float = 1e-3
    min_mass: float = 0.25
    min_weight: float = 0.0
    check_every: int = 25
    refit_iter: int = 20
    switch_margin: float = 0.01

    def __post_init__(self) -> None:
        for name in ("max_refine", "check_every", "refit_iter"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"FitPolicy.{name} must be an integer >= 0, got {value!r}")
        for name in ("refine_tol", "min_mass", "min_weight", "switch_margin"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < float("inf")):
                raise ValueError(f"FitPolicy.{name} must be a finite number >= 0, got {value!r}")
        if self.min_mass >= 1 or self.min_weight >= 1:
            raise ValueError(f"FitPolicy.min_mass and min_weight must be < 1, got {self.min_mass!r}, "
                             f"{self.min_weight!r}")


@dataclass
class FitDiagnostics:
    """What the fit-keeping policy did so far (counts summed over batch elements) and the last state.

    The counts that depend on the data (``refine_steps``, ``reseeds``, ``refits``) are 0-d int64 tensors on
    the fit's device once the policy has run (``int(...)`` reads one; :meth:`as_dict` reads all), so that
    counting costs no host synchronisation per call.

    Attributes:
        calls: differentiable steps taken.
        refine_steps: extra EM steps run by the refine stage on batch elements that had not converged.
        reseeds: components re-seeded.
        refits: fresh fits adopted.
        checks: fresh fits computed.
        log_lik: ``[*B]`` mean log-likelihood of the points under the parameters of the last step.
        mass_ratio: ``[*B, K]`` responsibility mass of each component over its weight at the last step.
        weights: ``[*B, K]`` the weights of that step's parameters (so ``mass_ratio × weights`` is the mass).
    """

    calls: int = 0
    refine_steps: int | Tensor = 0
    reseeds: int | Tensor = 0
    refits: int | Tensor = 0
    checks: int = 0
    log_lik: Tensor | None = field(default=None, repr=False)
    mass_ratio: Tensor | None = field(default=None, repr=False)
    weights: Tensor | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, float | int]:
        """JSON-ready summary (for ``metrics.json``)."""
        out: dict[str, float | int] = {"calls": self.calls, "refine_steps": int(self.refine_steps),
                                       "reseeds": int(self.reseeds), "refits": int(self.refits),
                                       "checks": self.checks}
        if self.mass_ratio is not None and self.weights is not None:
            out["min_mass_ratio"] = float(self.mass_ratio.min())
            out["min_mass_times_k"] = float((self.mass_ratio * self.weights).min()) * self.weights.shape[-1]
        if self.log_lik is not None:
            out["mean_log_lik"] = float(self.log_lik.mean())
        return out


def split_component(gmm: GMM, starved: Tensor, mass: Tensor) -> GMM:
    """Replace the starved components by halves of the component with the most mass.

    Per batch element of ``gmm`` (batch ``*B``) where ``starved [*B]`` is true: with ``h`` and ``l`` the
    components of largest and smallest ``mass [*B, K]`` and ``(λ, v)`` the top eigenpair of
    ``Σ_h``: ``m_h, m_l ← m_h ∓ ½√λ v``, ``Σ_l ← Σ_h``, and ``w_h, w_l ← (w_h + w_l)/2`` (weights keep their
    sum; with uniform fixed weights they are unchanged). At most one component per batch element per call.
    Returns a detached GMM.
    """
    w, m, c = gmm.weights.detach(), gmm.means.detach(), gmm.covariances.detach()
    heavy = mass.argmax(-1, keepdim=True)                                          # [*B, 1]
    light = mass.argmin(-1, keepdim=True)                                           # [*B, 1]
    d = m.shape[-1]
    rows = (*heavy.shape, d)
    cov_h = c.gather(-3, heavy[..., None, None].expand(*rows, d))                  # [*B, 1, D, D]
    lam, vec = torch.linalg.eigh(cov_h)
    offset = 0.5 * lam[..., -1:].clamp_min(0).sqrt() * vec[..., -1]                # [*B, 1, D]
    mean_h = m.gather(-2, heavy[..., None].expand(rows))
    half = 0.5 * (w.gather(-1, heavy) + w.gather(-1, light))
    w2 = w.scatter(-1, heavy, half).scatter(-1, light, half)
    m2 = m.scatter(-2, heavy[..., None].expand(rows), mean_h - offset)
    m2 = m2.scatter(-2, light[..., None].expand(rows), mean_h + offset)
    c2 = c.scatter(-3, light[..., None, None].expand(*rows, d), cov_h)
    dead = starved.unsqueeze(-1)
    return GMM(torch.where(dead, w2, w), torch.where(dead[..., None], m2, m), torch.where(dead[..., None, None], c2, c))


class WarmStartEM(nn.Module):
    """Warm-started EM (the paper's Algorithm 3) with a fit-keeping policy; one differentiable step per call.

    The first call fits a GMM to the (detached) points with ``n_init_iter`` EM steps from ``init``; each
    call then repairs the stored parameters with ``policy`` (see the module docstring; ``None``: plain
    Algorithm 3), takes one EM step from them on the current ``x`` with gradients, and stores its detached
    result. The stored parameters are buffers (``state_dict``, ``.to()``); :attr:`state` gives them as a GMM.

    Args:
        n_components: ``K``.
        init: ``"kmeans++"`` (or any :func:`imgmw.fit_gmm` init name) or a :class:`GMM` with the points' batch.
        fixed_weights: keep the weights (uniform ``1/K`` from a string init), the paper's choice; learned by
            default (see :mod:`imgmw.losses` for the measurement).
        reg_covar: ``ε_r`` of every step.
        n_init_iter: EM steps of the first fit.
        policy: :class:`FitPolicy` or ``None``.
        generator: ``torch.Generator`` of the k-means++ starts (first fit and fresh fits).
        chunk_size: points per chunk of the E-steps.
        process_group: ``torch.distributed`` group (or ``imgmw.distributed.WORLD``) over which the points are
            sharded: every call's statistics (and the fits of the policy) run over all ranks' points, so
            all ranks hold the same state (:mod:`imgmw.distributed`).

    Example:
        >>> em = WarmStartEM(4, generator=torch.Generator().manual_seed(0))
        >>> x = torch.randn(200, 2, requires_grad=True)
        >>> gmm = em(x)          # differentiable in x
        >>> gmm.means.sum().backward()
    """

    weights: Tensor | None   # buffers: the stored parameters (None before the first call)
    means: Tensor | None
    covariances: Tensor | None

    def __init__(self, n_components: int, *, init: str | GMM = "kmeans++", fixed_weights: bool = False,
                 reg_covar: float = 1e-6, n_init_iter: int = 10, policy: FitPolicy | None = FitPolicy(),
                 generator: torch.Generator | None = None, chunk_size: int | None = None,
                 process_group=None) -> None:
        super().__init__()
        check_reg_covar(reg_covar)
        if not isinstance(n_components, int) or n_components < 1:
            raise ValueError(f"n_components must be an integer >= 1, got {n_components!r}")
        if policy is not None and not isinstance(policy, FitPolicy):
            raise ValueError(f"policy must be a FitPolicy or None, got {type(policy).__name__}")
        self.n_components = n_components
        self.init = init
        self.fixed_weights = fixed_weights
        self.reg_covar = float(reg_covar)
        self.n_init_iter = n_init_iter
        self.policy = policy
        self.generator = generator
        self.chunk_size = chunk_size
        self.process_group = check_process_group(process_group)
        self.diagnostics = FitDiagnostics()
        for name in ("weights", "means", "covariances"):
            self.register_buffer(name, None)

    # ------------------------------------------------------------------------------------------- state
    @property
    def state(self) -> GMM | None:
        """The stored (detached) parameters, or ``None`` before the first call."""
        if self.weights is None or self.means is None or self.covariances is None:
            return None
        return GMM(self.weights, self.means, self.covariances)

    @state.setter
    def state(self, gmm: GMM | None) -> None:
        if gmm is None:
            self.weights = self.means = self.covariances = None
        else:
            self.weights, self.means = gmm.weights.detach(), gmm.means.detach()
            self.covariances = gmm.covariances.detach()

    def _stored(self) -> GMM:
        """:attr:`state` where the caller has made sure it is set."""
        gmm = self.state
        assert gmm is not None, "WarmStartEM has no stored parameters yet"
        return gmm

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        names = ("weights", "means", "covariances")
        present = [prefix + n in state_dict for n in names]
        if all(present):  # buffers that are None here are not filled by nn.Module's loader: set them
            for n in names:
                setattr(self, n, state_dict[prefix + n].clone())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def get_extra_state(self) -> dict:
        """The diagnostics in ``state_dict()``: the policy's schedule (``calls``) and its re-seed test (the last
        step's masses) depend on them, so a resumed run takes the same steps."""
        return dataclasses.asdict(self.diagnostics)

    def set_extra_state(self, state: dict) -> None:
        self.diagnostics = FitDiagnostics(**state)

    def reset(self) -> None:
        """Forget the stored parameters and diagnostics; the next call re-initialises."""
        self.state = None
        self.diagnostics = FitDiagnostics()

    # -------------------------------------------------------------------------------------------- calls
    def _fresh_fit(self, x: Tensor, mask: Tensor | None, sample_weight: Tensor | None, n_iter: int,
                   init: str | GMM, tol: float | None = None) -> tuple[GMM, Tensor]:
        fit = fit_gmm(x, self.n_components, n_iter=n_iter, tol=tol, init=init, fixed_weights=self.fixed_weights,
                      reg_covar=self.reg_covar, grad="none", mask=mask, sample_weight=sample_weight,
                      generator=self.generator, chunk_size=self.chunk_size, process_group=self.process_group)
        return fit.gmm, fit.lower_bound

    def _needs_init(self, x: Tensor) -> bool:
        state = self.state
        return state is None or state.batch_shape != x.shape[:-2] or state.device != x.device \
            or state.dtype != x.dtype or state.n_features != x.shape[-1]

    @torch.no_grad()
    def _repair(self, x: Tensor, weight: Tensor | None, mask: Tensor | None, sample_weight: Tensor | None) -> None:
        """Apply the policy to the stored parameters for the detached points ``x`` (point weights ``ω``).

        The re-seed test reads the masses of the previous call's step (free); refining and the fresh-fit
        comparison cost E-steps (see :class:`FitPolicy` for their budgets). Only the fresh-fit comparison
        (every ``check_every`` calls) reads values on the host (the fresh fit's k-means++ start and its
        convergence test)."""
        policy = self.policy
        assert policy is not None
        gmm = self._stored()
        diag = self.diagnostics
        ll: Tensor | None = None
        if policy.max_refine:
            stats = global_stats(gmm, x, weight, self.chunk_size, None, self.process_group)
            ll = stats.log_lik / stats.total
            done = torch.zeros_like(ll, dtype=torch.bool)
            for _ in range(policy.max_refine):  # converged elements are frozen (no host read to end early)
                new = GMM.where(done, gmm, m_step(stats, gmm, reg_covar=self.reg_covar,
                                                  fixed_weights=self.fixed_weights))
                stats = global_stats(new, x, weight, self.chunk_size, None, self.process_group)
                new_ll = stats.log_lik / stats.total
                diag.refine_steps = diag.refine_steps + (~done).sum()
                done = done | (new_ll - ll < policy.refine_tol)
                gmm, ll = new, torch.where(done, torch.maximum(ll, new_ll), new_ll)
        threshold = policy.min_mass if self.fixed_weights else policy.min_weight
        if threshold > 0 and self.n_components > 1 and diag.mass_ratio is not None:
            mass = diag.mass_ratio * gmm.weights  # responsibility masses of the last step [*B, K]
            starved = (diag.mass_ratio.amin(-1) < threshold) if self.fixed_weights else \
                (gmm.weights.amin(-1) < threshold / self.n_components)
            diag.reseeds = diag.reseeds + starved.sum()
            gmm, ll = split_component(gmm, starved, mass), None  # unchanged where nothing starved
        if policy.check_every and diag.calls % policy.check_every == policy.check_every - 1:
            if ll is None:
                stats = global_stats(gmm, x, weight, self.chunk_size, None, self.process_group)
                ll = stats.log_lik / stats.total
            fresh, fresh_ll = self._fresh_fit(x, mask, sample_weight, policy.refit_iter, "kmeans++",
                                              policy.refine_tol)
            better = fresh_ll > ll + policy.switch_margin
            diag.checks += better.numel()
            diag.refits = diag.refits + better.sum()
            gmm = GMM.where(better, fresh, gmm)
        self.state = gmm

    def forward(self, x: Tensor, *, mask: Tensor | None = None, sample_weight: Tensor | None = None,
                check_finite: bool = True) -> GMM:
        """One EM step on ``x [*B, N, D]`` (optional ``mask`` / ``sample_weight`` ``[*B, N]``) from the
        repaired stored parameters; returns a GMM differentiable in ``x``. ``check_finite=False`` skips the
        finiteness check of ``x`` (a host read per call) for callers that check the fit downstream (the MW2
        losses: their linear program rejects non-finite costs)."""
        check_points(x)
        # without a mask or weights every batch element has its N >= 1 points: no count to check
        counted = self.process_group is None and (mask is not None or sample_weight is not None)
        xw, weight = point_weights(x, mask, sample_weight, 1 if counted else None, check_finite=check_finite)
        if self._needs_init(x):
            self.diagnostics = FitDiagnostics()
            self.state = self._fresh_fit(x.detach(), mask, sample_weight, self.n_init_iter, self.init)[0]
        elif self.policy is not None:
            self._repair(xw.detach(), None if weight is None else weight.detach(), mask, sample_weight)
        prev = self._stored()
        stats = global_stats(prev, xw, weight, self.chunk_size, None, self.process_group)
        gmm = m_step(stats, prev, reg_covar=self.reg_covar, fixed_weights=self.fixed_weights)
        with torch.no_grad():
            diag = self.diagnostics
            diag.calls += 1
            diag.log_lik = (stats.log_lik / stats.total).detach()
            diag.mass_ratio = (stats.s0 / stats.total.unsqueeze(-1) / prev.weights).detach()
            diag.weights = prev.weights
        self.state = gmm
        return gmm
