"""Implicit (fixed-point) differentiation of the EM output, matrix-free.

At a fixed point ``θ* = F(θ*, X)`` of one EM step the implicit-function theorem gives

    dθ*/dX = (I − ∂_θF)⁻¹ ∂_X F,

so for a loss ``L(θ*)`` with incoming gradient ``ḡ = ∂L/∂θ*`` the gradient with respect to the points is
``(∂_X F)ᵀ u`` where ``u`` solves the adjoint system ``u = (∂_θF)ᵀ u + ḡ``.

Coordinates. The system is solved for ``F̃(φ, X) = φ(F(θ(φ), X))`` in unconstrained coordinates

    φ = (a, m, l),   a = log w − mean_k(log w)  (left out with fixed weights),
                     m the means,   l = the lower triangle of the Cholesky factor L_k (Σ_k = L_k L_kᵀ),

flattened per batch element into ``[*B, p]`` with ``p = K + K·D + K·D(D+1)/2`` (``K`` fewer with fixed
weights). ``θ(φ)`` is ``w = softmax(a)``, ``m``, ``Σ = L Lᵀ``. In θ-coordinates the Jacobian of a
softmax-normalised weight vector and of a symmetric matrix read through its Cholesky factor are
singular or ambiguous; in φ the linear system is well posed. Then

    ḡ_φ = (∂θ/∂φ)ᵀ ḡ,   u = (∂_φF̃)ᵀ u + ḡ_φ,   ∂L/∂X = (∂_X F̃)ᵀ u,

which equals the θ-coordinate formula by the chain rule.

Matrix-free. Every product ``(∂_φF̃)ᵀ u`` is one vector–Jacobian product of one EM step re-run at ``θ*``
with φ requiring grad (:class:`StepLinearisation`); products ``(∂_φF̃) v`` use the double-VJP trick. The
adjoint system is solved per batch element by

- ``"gmres"`` (default): restarted GMRES on ``A u = ḡ_φ`` with ``A = I − (∂_φF̃)ᵀ``; one VJP per
  iteration, minimises the residual over the Krylov space, so it needs at most ``p`` iterations in exact
  arithmetic and typically a handful; the most robust choice;
- ``"cg"``: conjugate gradients on the normal equations ``AᵀA u = Aᵀ ḡ_φ`` (CGNR); one VJP and one JVP
  per iteration, squares the condition number of ``A``;
- ``"fixed_point"``: the Neumann iteration ``u ← ḡ_φ + (∂_φF̃)ᵀ u``, which converges at EM's own linear
  rate ``ρ(∂_φF̃) < 1`` at a stable fixed point: ``log(tol)/log(ρ)`` VJPs, hundreds when ρ ≈ 0.97.

Both stop when the relative residual ``‖ḡ_φ + (∂_φF̃)ᵀu − u‖ / ‖ḡ_φ‖`` of every batch element is below
``tol``. A batch element whose solve did not converge falls back to ``u = ḡ_φ``, the first term of the
Neumann series, with a ``RuntimeWarning``: that is the one-step gradient ``(∂_X F(θ*, X))ᵀ ḡ`` of one EM
step at ``θ*`` (exactly so when ``θ*`` is a fixed point). Every solve's outcome is
recorded as an :class:`AdjointSolveInfo`, returned by :func:`last_solve_info` and passed to the optional
``callback``.

Memory. The autograd Function saves only ``X``, the point weights and ``θ_T`` (``O(N·D + K·D²)``); the
backward builds the graph of a single EM step (``O(N·K·D)`` per chunk of points, as the forward).
Nothing depends on the number of EM iterations.

Dense reference. :func:`dense_implicit_jacobian` builds ``∂_φF̃`` and ``∂_X F̃`` with
``torch.func.jacrev`` (the paper's approximate implicit, AI, gradient): ``O(p²)`` memory and
``p`` backward passes, usable only for small ``K·D²``. :func:`step_jacobian_norm` estimates
``‖∂_φF̃‖₂`` by power iteration on ``(∂_φF̃)ᵀ(∂_φF̃)`` (a coordinate-dependent number) and
:func:`step_spectral_radius` the coordinate-free spectral radius ``ρ(∂_φF̃)``, EM's local rate.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .deprecation import renamed_parameters
from .mstep import em_map
from .gmm import GMM

__all__ = [
    "SOLVERS",
    "AdjointSolveInfo",
    "StepLinearisation",
    "n_phi",
    "default_tol",
    "theta_to_phi",
    "phi_to_theta",
    "phi_step",
    "solve_adjoint",
    "implicit_em_fixed_point",
    "last_solve_info",
    "dense_step_jacobians",
    "dense_implicit_jacobian",
    "dense_implicit_gradient",
    "step_jacobian_norm",
    "step_spectral_radius",
]

SOLVERS = ("gmres", "cg", "fixed_point")
_PATIENCE = 20  # fixed-point iterations without any improvement before giving up
_RESTART = 30  # Krylov vectors kept per GMRES cycle


# --------------------------------------------------------------------------- coordinates
def _tril_index(d: int, device: torch.device) -> Tensor:
    """Flat indices ``row·D + col`` of the lower triangle of a ``D×D`` matrix (row-major order)."""
    rows, cols = torch.tril_indices(d, d, device=device)
    return rows * d + cols


def n_phi(n_components: int, n_features: int, fixed_weights: bool) -> int:
    """Length ``p`` of φ per batch element: ``K·(1 + D + D(D+1)/2)``, minus ``K`` with fixed weights."""
    k, d = n_components, n_features
    return k * (d + d * (d + 1) // 2) + (0 if fixed_weights else k)


def theta_to_phi(gmm: GMM, fixed_weights: bool) -> Tensor:
    """φ(θ) ``[*B, p]`` of a GMM: centred log-weights (unless ``fixed_weights``), means, tril of ``L_k``.

    The Cholesky factor is ``gmm.cholesky`` (jitter-safe), so φ is differentiable in the covariances.
    """
    d = gmm.n_features
    chol = gmm.cholesky.flatten(-2)[..., _tril_index(d, gmm.device)]  # [*B, K, D(D+1)/2]
    parts = [gmm.means.flatten(-2), chol.flatten(-2)]
    if not fixed_weights:
        log_w = gmm.weights.log()
        parts.insert(0, log_w - log_w.mean(-1, keepdim=True))
    return torch.cat(parts, dim=-1)


def phi_to_theta(phi: Tensor, n_components: int, n_features: int, weights: Tensor | None) -> GMM:
    """θ(φ) for ``phi [*B, p]``: ``w = softmax(a)`` (or the given fixed ``weights [*B, K]``), ``m``, ``Σ = L Lᵀ``.

    The returned GMM's Cholesky cache is seeded with ``L`` so that the E-step differentiates through ``L``
    directly instead of re-factorising ``L Lᵀ``.
    """
    k, d = n_components, n_features
    n_tri = d * (d + 1) // 2
    start = 0
    if weights is None:
        weights = torch.softmax(phi[..., :k], dim=-1)
        start = k
    means = phi[..., start:start + k * d].unflatten(-1, (k, d))
    tri = phi[..., start + k * d:start + k * d + k * n_tri].unflatten(-1, (k, n_tri))
    flat = tri.new_zeros(*tri.shape[:-1], d * d).index_copy(-1, _tril_index(d, phi.device), tri)
    chol = flat.unflatten(-1, (d, d))
    return GMM.from_cholesky(weights, means, chol)


@dataclass(frozen=True)
class _StepConfig:
    """Static arguments of one EM step (see :func:`imgmw.mstep.em_map`)."""

    reg_covar: float
    fixed_weights: bool
    chunk_size: int | None


def phi_step(phi: Tensor, x: Tensor, sample_weight: Tensor | None, fixed: Tensor | None, k: int,
             cfg: _StepConfig) -> Tensor:
    """``F̃(φ, X) = φ(F(θ(φ), X))`` ``[*B, p]``; ``fixed [*B, K]`` are the weights when they are fixed."""
    theta = phi_to_theta(phi, k, x.shape[-1], fixed)
    new, _ = em_map(theta, x, sample_weight, cfg.reg_covar, cfg.fixed_weights, cfg.chunk_size)
    return theta_to_phi(new, cfg.fixed_weights)


# --------------------------------------------------------------------------- linearisation
class StepLinearisation:
    """The linear maps of one EM step ``F̃`` at ``(φ(gmm), X)``, matrix-free.

    Builds the autograd graph of one step once (``O(N·K·D)`` memory, chunked like the forward) and then
    offers, for vectors ``[*B, p]``:

    - :meth:`vjp` ``u ↦ (∂_φF̃)ᵀ u``,  :meth:`jvp` ``v ↦ (∂_φF̃) v`` (double-VJP trick, built on demand),
    - :meth:`vjp_data` ``u ↦ ((∂_X F̃)ᵀ u, (∂_ω F̃)ᵀ u)`` (points and, if requested, point weights),
    - :meth:`pull_back` ``(ḡ_w, ḡ_m, ḡ_Σ) ↦ (∂θ/∂φ)ᵀ ḡ``,
    - :attr:`residual` ``F̃(φ, X) − φ`` (the fixed-point residual in φ-coordinates).

    Batch elements never mix: every map is block-diagonal over ``*B``.
    """

    @renamed_parameters(weight="sample_weight")
    def __init__(self, gmm: GMM, x: Tensor, sample_weight: Tensor | None = None, *, reg_covar: float = 1e-6,
                 fixed_weights: bool = False, chunk_size: int | None = None, data_grad: bool = True,
                 weight_grad: bool = False) -> None:
        self.k = gmm.n_components
        self.cfg = _StepConfig(float(reg_covar), bool(fixed_weights), chunk_size)
        self.fixed = gmm.weights.detach() if fixed_weights else None
        with torch.enable_grad():
            self.phi = theta_to_phi(gmm.detach(), fixed_weights).detach().requires_grad_(True)
            self.x = x.detach().requires_grad_(data_grad)
            self.sample_weight = None if sample_weight is None else sample_weight.detach().requires_grad_(weight_grad)
            self.out = phi_step(self.phi, self.x, self.sample_weight, self.fixed, self.k, self.cfg)
        self._dual: Tensor | None = None
        self._dual_grad: Tensor | None = None

    @property
    def residual(self) -> Tensor:
        """``F̃(φ, X) − φ`` ``[*B, p]`` (zero exactly at a fixed point)."""
        return (self.out - self.phi).detach()

    def vjp(self, u: Tensor) -> Tensor:
        """``(∂_φF̃)ᵀ u`` for ``u [*B, p]``."""
        return torch.autograd.grad(self.out, self.phi, u, retain_graph=True)[0]

    def jvp(self, v: Tensor) -> Tensor:
        """``(∂_φF̃) v`` for ``v [*B, p]``: the VJP of the linear map ``u ↦ (∂_φF̃)ᵀ u``."""
        if self._dual is None or self._dual_grad is None:
            with torch.enable_grad():
                self._dual = torch.zeros_like(self.out, requires_grad=True)
                self._dual_grad = torch.autograd.grad(self.out, self.phi, self._dual, create_graph=True)[0]
        return torch.autograd.grad(self._dual_grad, self._dual, v, retain_graph=True)[0]

    def vjp_data(self, u: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """``((∂_X F̃)ᵀ u [*B, N, D], (∂_ω F̃)ᵀ u [*B, N])``; ``None`` for inputs built without grad."""
        inputs = [t for t in (self.x, self.sample_weight) if t is not None and t.requires_grad]
        if not inputs:
            return None, None
        grads = iter(torch.autograd.grad(self.out, inputs, u, retain_graph=True))
        gx = next(grads) if self.x.requires_grad else None
        gw = next(grads) if self.sample_weight is not None and self.sample_weight.requires_grad else None
        return gx, gw

    def pull_back(self, g_weights: Tensor, g_means: Tensor, g_covariances: Tensor) -> Tensor:
        """``(∂θ/∂φ)ᵀ ḡ`` ``[*B, p]`` for gradients with respect to ``(w, m, Σ)`` of ``θ(φ)``."""
        with torch.enable_grad():
            phi = self.phi.detach().requires_grad_(True)
            theta = phi_to_theta(phi, self.k, self.x.shape[-1], self.fixed)
            outs = [theta.means, theta.covariances]
            grads = [g_means, g_covariances]
            if self.fixed is None:
                outs.insert(0, theta.weights)
                grads.insert(0, g_weights)
            return torch.autograd.grad(outs, phi, grads)[0]


# --------------------------------------------------------------------------- adjoint solvers
@dataclass
class AdjointSolveInfo:
    """Outcome of one adjoint solve ``u = (∂_φF̃)ᵀ u + ḡ_φ``.

    Attributes:
        solver: ``"gmres"``, ``"cg"`` or ``"fixed_point"``.
        iterations: iterations performed (each costs one VJP, plus one JVP for ``"cg"``; Krylov
            solvers add one VJP per restart for the true residual).
        residual: ``[*B]`` relative residual ``‖ḡ_φ + (∂_φF̃)ᵀu − u‖ / ‖ḡ_φ‖`` of the solution returned
            by the solver (before any fallback).
        converged: ``[*B]`` whether ``residual <= tol`` (the others fell back to ``u = ḡ_φ``).
        tol: the tolerance used.
        fixed_point_residual: ``[*B]`` relative forward residual ``‖F̃(φ*, X) − φ*‖ / ‖φ*‖``: how far
            ``θ*`` is from a fixed point, i.e. how much the implicit-function assumption is violated.
    """

    solver: str
    iterations: int
    residual: Tensor
    converged: Tensor
    tol: float
    fixed_point_residual: Tensor


_LAST_SOLVE: list[AdjointSolveInfo] = []


def last_solve_info() -> AdjointSolveInfo | None:
    """The :class:`AdjointSolveInfo` of the most recent implicit backward pass in this process, or None."""
    return _LAST_SOLVE[-1] if _LAST_SOLVE else None


def _record(info: AdjointSolveInfo) -> None:
    _LAST_SOLVE[:] = [info]


def _norm(v: Tensor) -> Tensor:
    return v.norm(dim=-1)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with 0 where ``den`` is 0 (finished batch elements stop moving)."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _adjoint_residual(op: StepLinearisation, g: Tensor, u: Tensor) -> Tensor:
    """``g + Jᵀu − u`` ``[*B, p]``: the residual of the adjoint system at ``u``."""
    return g + op.vjp(u) - u


def _solve_fixed_point(op: StepLinearisation, g: Tensor, tol: float, max_iter: int) -> tuple[Tensor, Tensor, int]:
    """Neumann iteration ``u ← g + Jᵀu`` from ``u = g``; returns ``(u, relative residual [*B], iterations)``.

    The residual of ``u_k`` is ``u_{k+1} − u_k``, so it comes with the update. Stops early when no batch
    element's residual improved for ``_PATIENCE`` iterations (a rounding floor above ``tol``).
    """
    scale = _norm(g)
    u = g
    res = best = torch.full_like(scale, math.inf)
    stalled = 0
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 -- `it` is returned: the number of iterations taken
        step = _adjoint_residual(op, g, u)
        res = _safe_div(_norm(step), scale)
        if bool((res <= tol).all()):
            break
        stalled = 0 if bool((res < best).any()) else stalled + 1
        best = torch.minimum(best, res)
        if stalled >= _PATIENCE:
            break
        u = u + step
    return u, res, it


def _cg_cycle(op: StepLinearisation, u: Tensor, r: Tensor, scale: Tensor, tol: float,
              budget: int) -> tuple[Tensor, int]:
    """CGNR iterations for ``A u = g`` (``A = I − Jᵀ``, ``Aᵀ = I − J``) from ``u`` with residual ``r = g − A u``.

    Runs until the recurrence residual of every batch element is ``<= tol`` or ``budget`` iterations;
    returns ``(u, iterations)``.
    """
    z = r - op.jvp(r)
    p = z
    zz = _dot(z, z)
    it = 0
    while True:
        it += 1
        w = p - op.vjp(p)
        alpha = _safe_div(zz, _dot(w, w)).unsqueeze(-1)
        u = u + alpha * p
        r = r - alpha * w
        if it >= budget or bool((_safe_div(_norm(r), scale) <= tol).all()):
            return u, it
        z = r - op.jvp(r)
        zz_new = _dot(z, z)
        p = z + _safe_div(zz_new, zz).unsqueeze(-1) * p
        zz = zz_new


def _gmres_cycle(op: StepLinearisation, u: Tensor, r: Tensor, scale: Tensor, tol: float,
                 budget: int) -> tuple[Tensor, int]:
    """One GMRES(m) cycle for ``A u = g`` (``A = I − Jᵀ``) from ``u`` with residual ``r = g − A u``.

    Arnoldi with modified Gram–Schmidt builds ``A V_j = V_{j+1} H_j`` per batch element; Givens rotations
    keep ``H_j`` upper triangular so that the residual norm of the minimiser of ``‖βe₁ − H_j y‖`` is
    read off without solving. Runs ``min(_RESTART, budget)`` iterations or until every element's
    residual is ``<= tol``; returns ``(u + V y, iterations)``.
    """
    m = min(_RESTART, budget)
    lead = r.shape[:-1]
    beta = _norm(r)
    basis = [_safe_div(r, beta.unsqueeze(-1))]
    h = r.new_zeros(*lead, m + 1, m)
    cs, sn = r.new_zeros(*lead, m), r.new_zeros(*lead, m)
    e = r.new_zeros(*lead, m + 1)
    e[..., 0] = beta
    j = 0
    for j in range(m):
        w = basis[j] - op.vjp(basis[j])
        for i in range(j + 1):
            h[..., i, j] = _dot(w, basis[i])
            w = w - h[..., i, j].unsqueeze(-1) * basis[i]
        h[..., j + 1, j] = _norm(w)
        basis.append(_safe_div(w, h[..., j + 1, j].unsqueeze(-1)))
        for i in range(j):  # previous rotations on the new column
            a, b = h[..., i, j].clone(), h[..., i + 1, j].clone()
            h[..., i, j], h[..., i + 1, j] = cs[..., i] * a + sn[..., i] * b, cs[..., i] * b - sn[..., i] * a
        a, b = h[..., j, j].clone(), h[..., j + 1, j].clone()
        den = torch.hypot(a, b)
        cs[..., j] = torch.where(den > 0, _safe_div(a, den), torch.ones_like(den))
        sn[..., j] = _safe_div(b, den)
        h[..., j, j], h[..., j + 1, j] = den, 0.0
        e[..., j + 1], e[..., j] = -sn[..., j] * e[..., j], cs[..., j] * e[..., j]
        if bool((_safe_div(e[..., j + 1].abs(), scale) <= tol).all()):
            break
    k = j + 1
    tri = h[..., :k, :k]
    diag = tri.diagonal(dim1=-2, dim2=-1)
    tri = tri + torch.diag_embed(torch.where(diag == 0, torch.ones_like(diag), torch.zeros_like(diag)))
    y = torch.linalg.solve_triangular(tri, e[..., :k].unsqueeze(-1), upper=True).squeeze(-1)
    return u + (y.unsqueeze(-1) * torch.stack(basis[:k], dim=-2)).sum(-2), k


def _solve_krylov(cycle, op: StepLinearisation, g: Tensor, tol: float, max_iter: int) -> tuple[Tensor, Tensor, int]:
    """Restarted Krylov solve of ``A u = g`` from ``u = g`` with ``cycle`` (:func:`_gmres_cycle`, :func:`_cg_cycle`).

    Each cycle ends with the true residual ``g − A u`` (recurrences drift from it in finite precision)
    and the solver restarts from it while it keeps improving (by 2× at least) for some unconverged batch
    element and the iteration budget lasts.
    """
    scale = _norm(g)
    u = g
    r = _adjoint_residual(op, g, u)
    res = _safe_div(_norm(r), scale)
    it = 0
    while it < max_iter and not bool((res <= tol).all()):
        u, used = cycle(op, u, r, scale, tol, max_iter - it)
        it += used
        r = _adjoint_residual(op, g, u)
        new = _safe_div(_norm(r), scale)
        improving = bool(((new < 0.5 * res) & (res > tol)).any())
        res = new
        if not improving:
            break
    return u, res, it


def default_tol(dtype: torch.dtype) -> float:
    """Default relative residual tolerance: ``√eps`` of the dtype (1.5e-8 in float64, 3.5e-4 in float32)."""
    return math.sqrt(torch.finfo(dtype).eps)


def solve_adjoint(op: StepLinearisation, g: Tensor, *, solver: str = "gmres", tol: float | None = None,
                  max_iter: int = 200) -> tuple[Tensor, AdjointSolveInfo]:
    """Solve ``u = (∂_φF̃)ᵀ u + g`` for ``g [*B, p]``, with the one-step fallback ``u = g`` per element.

    Returns ``(u [*B, p], info)``; warns (``RuntimeWarning``) when some batch element did not reach
    ``tol`` within ``max_iter`` iterations or produced a non-finite residual.
    """
    _check_options(solver, tol, max_iter)
    tol = default_tol(g.dtype) if tol is None else float(tol)
    with torch.no_grad():
        if solver == "fixed_point":
            u, res, it = _solve_fixed_point(op, g, tol, max_iter)
        else:
            u, res, it = _solve_krylov(_gmres_cycle if solver == "gmres" else _cg_cycle, op, g, tol, max_iter)
        ok = torch.isfinite(res) & (res <= tol) & torch.isfinite(u).all(-1)
        fp = _safe_div(_norm(op.residual), _norm(op.phi.detach()))
    info = AdjointSolveInfo(solver, it, res, ok, tol, fp)
    if not bool(ok.all()):
        bad = int((~ok).sum())
        hint = "raise max_iter or tol" if solver == "gmres" else "raise max_iter or use solver='gmres'"
        warnings.warn(
            f"implicit EM gradient: the {solver} adjoint solve did not converge for {bad} of {ok.numel()} "
            f"batch element(s) (relative residual {float(res.nan_to_num(math.inf).max()):.3g} > tol {tol:.3g} "
            f"after {it} iterations); using the one-step gradient there. Run more EM iterations so that "
            f"θ_T is closer to a fixed point, or {hint}.", RuntimeWarning, stacklevel=2)
        u = torch.where(ok.unsqueeze(-1), u, g)
    return u, info


def _check_options(solver: str, tol: float | None, max_iter: int) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(map(repr, SOLVERS))}; got {solver!r}")
    if tol is not None and not (isinstance(tol, (int, float)) and tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number > 0 or None (dtype default), got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")


# --------------------------------------------------------------------------- the autograd Function
@dataclass(frozen=True)
class _ImplicitConfig:
    step: _StepConfig
    solver: str
    tol: float | None
    max_iter: int
    callback: Callable[[AdjointSolveInfo], None] | None


class _ImplicitEMStep(torch.autograd.Function):
    """``(x, ω, w₀, m₀, Σ₀) ↦ (w, m, Σ, ℓ)``: one EM step forward, implicit-function gradient backward.

    The outputs are ``θ_T = F(θ_{T−1}, X)`` and the mean log-likelihood ``ℓ [*B]`` (not differentiable).
    Backward treats ``θ_T`` as the fixed point ``θ*(X)``: it returns ``(∂_X F̃)ᵀ u`` for ``x`` (and
    ``(∂_ω F̃)ᵀ u`` for the point weights) and no gradient for ``θ_{T−1}``, on which ``θ*`` does not depend.
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, w0: Tensor, m0: Tensor, s0: Tensor,
                cfg: _ImplicitConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c = cfg.step
        new, ll = em_map(GMM(w0, m0, s0), x, weight, c.reg_covar, c.fixed_weights, c.chunk_size)
        return new.weights.clone(), new.means, new.covariances, ll

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, _, _, _, cfg = inputs
        w, m, s, ll = output
        ctx.mark_non_differentiable(ll)
        ctx.save_for_backward(x, weight, w, m, s)
        ctx.cfg = cfg

    @staticmethod
    @once_differentiable
    def backward(ctx, g_w: Tensor, g_m: Tensor, g_s: Tensor, _g_ll: Tensor):
        x, weight, w, m, s = ctx.saved_tensors
        cfg: _ImplicitConfig = ctx.cfg
        c = cfg.step
        op = StepLinearisation(GMM(w, m, s), x, weight, reg_covar=c.reg_covar, fixed_weights=c.fixed_weights,
                               chunk_size=c.chunk_size, data_grad=ctx.needs_input_grad[0],
                               weight_grad=ctx.needs_input_grad[1])
        g_phi = op.pull_back(g_w, g_m, g_s)
        u, info = solve_adjoint(op, g_phi, solver=cfg.solver, tol=cfg.tol, max_iter=cfg.max_iter)
        _record(info)
        if cfg.callback is not None:
            cfg.callback(info)
        gx, gweight = op.vjp_data(u)
        return gx, gweight, None, None, None, None


@renamed_parameters(weight="sample_weight")
def implicit_em_fixed_point(prev: GMM, x: Tensor, sample_weight: Tensor | None = None, *, reg_covar: float = 1e-6,
                            fixed_weights: bool = False, chunk_size: int | None = None,
                            solver: str = "gmres", tol: float | None = None, max_iter: int = 200,
                            callback: Callable[[AdjointSolveInfo], None] | None = None) -> tuple[GMM, Tensor]:
    """One EM step ``θ_T = F(θ_{T−1}, X)`` whose backward is the implicit-function gradient at ``θ_T``.

    This is the last step of :func:`imgmw.fit_gmm` with ``grad="implicit"``; ``implicit_options`` of
    ``fit_gmm`` are the keyword arguments ``solver``, ``tol``, ``max_iter`` and ``callback`` here.

    Args:
        prev: ``θ_{T−1}``, batch ``*B`` (treated as a constant).
        x: ``[*B, N, D]`` points (may require grad).
        sample_weight: ``[*B, N]`` point weights or ``None`` (may require grad).
        reg_covar, fixed_weights, chunk_size: as in :func:`imgmw.em_step`.
        solver: ``"gmres"`` (restarted GMRES), ``"cg"`` (CG on the normal equations) or
            ``"fixed_point"`` (Neumann iteration).
        tol: relative residual at which the adjoint solve stops; ``None`` is ``√eps`` of ``x.dtype``.
        max_iter: maximum solver iterations; on failure the one-step gradient is used with a warning.
        callback: called with the :class:`AdjointSolveInfo` of every backward pass.

    Returns:
        ``(GMM θ_T, mean log-likelihood [*B] under θ_{T−1})``, as :func:`imgmw.mstep.em_map`.
    """
    _check_options(solver, tol, max_iter)
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable or None, got {type(callback).__name__}")
    cfg = _ImplicitConfig(_StepConfig(float(reg_covar), bool(fixed_weights), chunk_size), solver, tol, max_iter,
                          callback)
    w, m, s, ll = _ImplicitEMStep.apply(x, sample_weight, prev.weights.detach(), prev.means.detach(),
                                        prev.covariances.detach(), cfg)
    return GMM(w, m, s), ll


# --------------------------------------------------------------------------- dense reference (AI)
def _flat_batch(gmm: GMM, x: Tensor, weight: Tensor | None):
    """Yield per-element ``(gmm_b, x_b, weight_b)`` over the flattened batch ``*B``."""
    bshape = x.shape[:-2]
    nb = math.prod(bshape)
    gw = gmm.weights.reshape(nb, *gmm.weights.shape[len(bshape):])
    gm = gmm.means.reshape(nb, *gmm.means.shape[len(bshape):])
    gs = gmm.covariances.reshape(nb, *gmm.covariances.shape[len(bshape):])
    xs = x.reshape(nb, *x.shape[len(bshape):])
    ws = None if weight is None else weight.reshape(nb, x.shape[-2])
    for b in range(nb):
        yield GMM(gw[b], gm[b], gs[b]), xs[b], None if ws is None else ws[b]


@renamed_parameters(weight="sample_weight")
def dense_step_jacobians(gmm: GMM, x: Tensor, sample_weight: Tensor | None = None, *, reg_covar: float = 1e-6,
                         fixed_weights: bool = False, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Dense ``(∂_φF̃ [*B, p, p], ∂_X F̃ [*B, p, N, D])`` at ``(φ(gmm), X)`` via ``torch.func.jacrev``.

    Memory ``O(p² + p·N·D)`` per batch element (looped over ``*B``): a small-size reference only.
    """
    from torch.func import jacrev

    cfg = _StepConfig(float(reg_covar), bool(fixed_weights), chunk_size)
    k = gmm.n_components
    j_phi, j_x = [], []
    for g, xb, wb in _flat_batch(gmm.detach(), x.detach(), None if sample_weight is None else sample_weight.detach()):
        fixed = g.weights if fixed_weights else None
        phi = theta_to_phi(g, fixed_weights)
        jp, jx = jacrev(lambda p_, x_, wb=wb, fixed=fixed: phi_step(p_, x_, wb, fixed, k, cfg), argnums=(0, 1))(phi, xb)
        j_phi.append(jp)
        j_x.append(jx)
    bshape = x.shape[:-2]
    return (torch.stack(j_phi).reshape(*bshape, *j_phi[0].shape),
            torch.stack(j_x).reshape(*bshape, *j_x[0].shape))


@renamed_parameters(weight="sample_weight")
def dense_implicit_jacobian(gmm: GMM, x: Tensor, sample_weight: Tensor | None = None, *, reg_covar: float = 1e-6,
                            fixed_weights: bool = False, chunk_size: int | None = None) -> Tensor:
    """The paper's approximate implicit Jacobian ``dφ*/dX = (I − ∂_φF̃)⁻¹ ∂_X F̃`` ``[*B, p, N, D]`` at ``gmm``."""
    j_phi, j_x = dense_step_jacobians(gmm, x, sample_weight, reg_covar=reg_covar, fixed_weights=fixed_weights,
                                      chunk_size=chunk_size)
    eye = torch.eye(j_phi.shape[-1], dtype=j_phi.dtype, device=j_phi.device)
    sol = torch.linalg.solve(eye - j_phi, j_x.flatten(-2))
    return sol.unflatten(-1, x.shape[-2:])


@renamed_parameters(weight="sample_weight")
def dense_implicit_gradient(gmm: GMM, x: Tensor, grads: tuple[Tensor, Tensor, Tensor],
                            sample_weight: Tensor | None = None, *, reg_covar: float = 1e-6,
                            fixed_weights: bool = False, chunk_size: int | None = None) -> Tensor:
    """AI gradient ``(dφ*/dX)ᵀ (∂θ/∂φ)ᵀ ḡ`` ``[*B, N, D]`` for ``grads = (ḡ_w, ḡ_m, ḡ_Σ)`` at ``θ* = gmm``."""
    jac = dense_implicit_jacobian(gmm, x, sample_weight, reg_covar=reg_covar, fixed_weights=fixed_weights,
                                  chunk_size=chunk_size)
    op = StepLinearisation(gmm, x, sample_weight, reg_covar=reg_covar, fixed_weights=fixed_weights,
                           chunk_size=chunk_size)
    g_phi = op.pull_back(*grads)
    return (g_phi.unsqueeze(-1).unsqueeze(-1) * jac).sum(-3)


# --------------------------------------------------------------------------- operator norm
@renamed_parameters(weight="sample_weight")
def step_jacobian_norm(gmm: GMM, x: Tensor, sample_weight: Tensor | None = None, *, reg_covar: float = 1e-6,
                       fixed_weights: bool = False, chunk_size: int | None = None, n_iter: int = 100,
                       rtol: float = 1e-6, generator: torch.Generator | None = None) -> Tensor:
    """``‖∂_φF̃(φ(gmm), X)‖₂`` ``[*B]`` by power iteration on ``(∂_φF̃)ᵀ ∂_φF̃`` (one JVP + one VJP each).

    Stops when every batch element's estimate changes by less than ``rtol`` (relative) or after
    ``n_iter`` iterations. ``σ_max < 1`` is a sufficient condition for the ``"fixed_point"`` adjoint
    solver (and EM itself) to converge locally; the rate is the spectral radius ``ρ ≤ σ_max``.
    """
    op = StepLinearisation(gmm, x, sample_weight, reg_covar=reg_covar, fixed_weights=fixed_weights,
                           chunk_size=chunk_size, data_grad=False)
    v = torch.randn(op.phi.shape, dtype=x.dtype, device=x.device, generator=generator)
    v = v / _norm(v).unsqueeze(-1)
    sigma = torch.zeros(v.shape[:-1], dtype=x.dtype, device=x.device)
    for _ in range(n_iter):
        jv = op.jvp(v)
        new = _norm(jv)
        w = op.vjp(jv)
        v = w / _norm(w).clamp_min(torch.finfo(x.dtype).tiny).unsqueeze(-1)
        done = bool(((new - sigma).abs() <= rtol * new).all())
        sigma = new
        if done:
            break
    return sigma.detach()


@renamed_parameters(weight="sample_weight")
def step_spectral_radius(gmm: GMM, x: Tensor, sample_weight: Tensor | None = None, *, reg_covar: float = 1e-6,
                         fixed_weights: bool = False, chunk_size: int | None = None, n_iter: int = 60,
                         generator: torch.Generator | None = None) -> Tensor:
    """Spectral radius ``ρ(∂_φF̃)`` ``[*B]``: EM's local linear rate and the Neumann solver's rate.

    Unlike the norm, ``ρ`` does not depend on the coordinates (``∂_φF̃`` is similar to ``∂_θF`` at a
    fixed point). Estimated from the growth of ``v_k = ((∂_φF̃)ᵀ)^k v`` over the second half of
    ``n_iter`` VJPs, ``(‖v_n‖ / ‖v_{n/2}‖)^{2/n}``, which also averages over complex eigenvalue pairs.
    """
    op = StepLinearisation(gmm, x, sample_weight, reg_covar=reg_covar, fixed_weights=fixed_weights,
                           chunk_size=chunk_size, data_grad=False)
    tiny = torch.finfo(x.dtype).tiny
    v = torch.randn(op.phi.shape, dtype=x.dtype, device=x.device, generator=generator)
    v = v / _norm(v).unsqueeze(-1)
    half = n_iter // 2
    log_growth = torch.zeros(v.shape[:-1], dtype=x.dtype, device=x.device)
    at_half = log_growth
    for k in range(n_iter):
        v = op.vjp(v)
        size = _norm(v).clamp_min(tiny)
        log_growth = log_growth + size.log()
        v = v / size.unsqueeze(-1)
        if k + 1 == half:
            at_half = log_growth
    return ((log_growth - at_half) / (n_iter - half)).exp().detach()
