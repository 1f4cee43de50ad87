"""Gaussian 2-Wasserstein (Bures–Wasserstein) quantities between the components of two mixtures.

For Gaussians ``N(m, Σ)`` and ``N(m', Σ')``

    W2² = ‖m − m'‖² + tr Σ + tr Σ' − 2 tr((Σ^½ Σ' Σ^½)^½).

With ``Σ = L Lᵀ`` (Cholesky), ``Σ^½ Σ' Σ^½`` is similar to ``M = Lᵀ Σ' L`` (``Σ^½ = L Q`` for an
orthogonal ``Q``), so the trace term is ``T = Σ_i sqrt(λ_i(M))``: eigenvalues only (``eigvalsh``), no
matrix square root. Eigenvalues are clamped to ``≥ eps · λ_max`` before the square root. The gradients
are written in closed form (a custom backward), from ``M = V diag(λ) Vᵀ``:

    ∂T/∂Σ = ½ L⁻ᵀ M^½ L⁻¹   (half the Monge map Σ → Σ'),    ∂T/∂Σ' = ½ L M^{-½} Lᵀ,

which, like every spectral-function gradient, has no ``1/(λ_i − λ_j)`` terms: finite for repeated
eigenvalues (``Σ = Σ' = I``), and finite for rank-deficient covariances plus a small jitter (``1/√λ`` is
zero below the clamp). The backward pass computes eigenvectors only for the component pairs whose
incoming gradient is non-zero: under an optimal-transport plan at most ``K0 + K1 − 1`` of ``K0·K1``; for
small problems the forward pass computes them for all pairs at once instead, with the per-pair gradient
matrices, and the backward pass is two GEMMs.

Also here: the affine Gaussian Monge maps between all component pairs and the fixed-point Gaussian
W2 barycentre of covariances, both without gradient.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .gmm import GMM
from .linalg import cholesky_inverse_transpose

__all__ = ["gaussian_w2_cost", "mean_differences", "squared_mean_distances", "w2_cost", "bures_cost", "BuresTerms",
           "bures_forward", "bures_backward", "pair_gradients", "dense_backward", "flatten_batch", "batch_shape",
           "psd_sqrt", "gaussian_monge_maps", "bures_barycentre", "ROUNDOFF_TOL"]

# Elements of the D×D matrices formed at once by the pairwise trace term.
PAIR_CHUNK_ELEMENTS = 1 << 22
# Below this many elements (pairs × D²) the backward does every pair at once instead of the support only.
DENSE_BACKWARD_ELEMENTS = 1 << 12
# Up to this many elements (pairs × D²) the forward's M_kl are kept for the backward instead of formed again.
KEEP_SANDWICH_ELEMENTS = 1 << 20
# Fixed-point iterations (barycentres) stop at latest when a relative change is below this many dtype eps.
ROUNDOFF_TOL = 16


def _eig_floor(lam: Tensor) -> Tensor:
    """``[..., 1]`` floor ``max(eps · λ_max, tiny)`` for ascending eigenvalues ``lam [..., D]``."""
    info = torch.finfo(lam.dtype)
    return (lam[..., -1:] * info.eps).clamp_min(info.tiny)


def _sandwich(la: Tensor, cb: Tensor) -> Tensor:
    """``M = Laᵀ Σb La`` for factors ``la [..., D, D]`` and covariances ``cb [..., D, D]`` (broadcast)."""
    return la.mT @ cb @ la


def _all_sandwiches(la: Tensor, cb: Tensor) -> Tensor:
    """``M_kl = Laₖᵀ Σb_l Laₖ`` for all pairs: ``la [N, K0, D, D]``, ``cb [N, K1, D, D]`` → ``[N, K0, K1, D, D]``.

    Two large GEMMs instead of ``2·K0·K1`` small products: ``Z = [Σb_1; …; Σb_K1] [La_1 … La_K0]`` gives every
    ``Σb_l La_k`` at once, then one batched product per ``k`` applies ``Laₖᵀ`` to all ``l``.
    """
    n, k0, d = la.shape[0], la.shape[1], la.shape[-1]
    k1 = cb.shape[1]
    cols = la.transpose(1, 2).reshape(n, d, k0 * d)  # [La_1 … La_K0]
    z = cb.reshape(n, k1 * d, d) @ cols  # block (l, k) = Σb_l La_k
    z = z.view(n, k1, d, k0, d).permute(0, 3, 2, 1, 4).reshape(n, k0, d, k1 * d)
    return (la.mT @ z).view(n, k0, d, k1, d).transpose(2, 3)


def _row_chunks(rows: int, per_row: int) -> list[tuple[int, int]]:
    step = max(1, PAIR_CHUNK_ELEMENTS // max(1, per_row))
    return [(s, min(s + step, rows)) for s in range(0, rows, step)]


def _trace_sqrt(lam: Tensor) -> Tensor:
    """``Σ_i √λ_i`` over the last dim of eigenvalues ``lam [..., D]``, clamped at the eigenvalue floor."""
    return lam.clamp_min(_eig_floor(lam)).sqrt().sum(-1)


def _roots(lam: Tensor) -> tuple[Tensor, Tensor]:
    """``(√λ, 1/√λ)`` for ascending eigenvalues ``lam [..., D]`` clamped at the eigenvalue floor, with ``1/√λ``
    zero below the floor (the derivative of the clamp)."""
    floor = _eig_floor(lam)
    root = lam.clamp_min(floor).sqrt()
    return root, root.reciprocal().masked_fill_(lam < floor, 0.0)


def pair_gradients(root: Tensor, inv_root: Tensor, u: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of one pair's squared Bures distance ``B = tr Σa + tr Σb − 2 tr(M^½)`` (``M = Laᵀ Σb La``):

        ∂B/∂Σa = I − Pa M^½ Paᵀ,   ∂B/∂Σb = I − La M^{-½} Laᵀ   (``Pa = La⁻ᵀ``; the first is ``I −`` the Monge map)

    from ``M = V diag(λ) Vᵀ`` given by ``(root, inv_root) = (√λ, 1/√λ) [..., D]`` (:func:`_roots`), ``u = Pa V`` and
    ``w = La V`` (``[..., D, D]``). Returns two ``[..., D, D]``.
    """
    eye = torch.eye(u.shape[-1], dtype=u.dtype, device=u.device)
    return eye - (u * root.unsqueeze(-2)) @ u.mT, eye - (w * inv_root.unsqueeze(-2)) @ w.mT


class BuresTerms(NamedTuple):
    """What :func:`bures_forward` computes."""

    bures: Tensor  # [N, K0, K1] squared Bures distances
    grads: tuple[Tensor, Tensor] | None  # per-pair gradients (gradients=True)
    sandwiches: Tensor | None  # M [N, K0, K1, D, D] (keep_sandwiches=True, small problems)


def bures_forward(ca: Tensor, cb: Tensor, la: Tensor, *, gradients: bool = False,
                  keep_sandwiches: bool = False) -> BuresTerms:
    """Squared Bures distances ``B_kl = tr Σa_k + tr Σb_l − 2 tr((Laₖᵀ Σb_l Laₖ)^½)`` (:class:`BuresTerms`).

    Flat batch ``N``: ``ca [N, K0, D, D]``, ``cb [N, K1, D, D]``, ``la [N, K0, D, D]`` with ``Σa = La Laᵀ``.
    With ``gradients=False`` only eigenvalues are computed, chunked over ``k`` so that at most
    ``PAIR_CHUNK_ELEMENTS`` entries of the ``M_kl = Laₖᵀ Σb_l Laₖ`` exist at once, and ``grads`` is ``None``;
    ``keep_sandwiches`` returns the ``M_kl`` too when they were formed at once and have at most
    ``KEEP_SANDWICH_ELEMENTS`` entries (for :func:`bures_backward`), else ``None``.
    With ``gradients=True`` (meant for small problems, where one ``eigh`` of all pairs costs less than an
    ``eigvalsh`` now and an ``eigh`` of the support later) ``grads = (∂B_kl/∂Σa_k, ∂B_kl/∂Σb_l)``, both
    ``[N, K0, K1, D, D]``, of every pair (:func:`pair_gradients`), for the caller to contract with the incoming
    gradient; any broadcasting batch dims ``*B`` may then stand for ``N``. No autograd (callers wrap it).
    """
    grads = sandwiches = None
    if gradients:
        la_k = la.unsqueeze(-3)
        lam, vec = torch.linalg.eigh(la_k.mT @ cb.unsqueeze(-4) @ la_k)
        root, inv_root = _roots(lam)
        cross = root.sum(-1)
        grads = pair_gradients(root, inv_root, cholesky_inverse_transpose(la).unsqueeze(-3) @ vec, la_k @ vec)
    else:
        n, k0, k1, d = ca.shape[0], ca.shape[-3], cb.shape[-3], ca.shape[-1]
        cross = ca.new_empty(n, k0, k1)
        chunks = _row_chunks(k0, n * k1 * d * d)
        for s, e in chunks:
            m = _all_sandwiches(la[:, s:e], cb)
            cross[:, s:e] = _trace_sqrt(torch.linalg.eigvalsh(m))
        if keep_sandwiches and len(chunks) == 1 and m.numel() <= KEEP_SANDWICH_ELEMENTS:
            sandwiches = m
    trace_a = ca.diagonal(dim1=-2, dim2=-1).sum(-1)
    trace_b = cb.diagonal(dim1=-2, dim2=-1).sum(-1)
    return BuresTerms(trace_a.unsqueeze(-1) + trace_b.unsqueeze(-2) - 2.0 * cross, grads, sandwiches)


def dense_backward(n_pairs: int, n_active: int, d: int) -> bool:
    """Whether :func:`bures_backward` should treat all ``n_pairs`` pairs at once rather than the
    ``n_active`` pairs with a non-zero gradient: when those are most pairs, or the problem is tiny."""
    return 2 * n_active >= n_pairs or n_pairs * d * d <= DENSE_BACKWARD_ELEMENTS


def bures_backward(grad: Tensor, cb: Tensor, la: Tensor, *, support: tuple[Tensor, ...] | None = None,
                   sandwiches: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Vector-Jacobian product of :func:`bures_forward`: ``(∂/∂Σa [N, K0, D, D], ∂/∂Σb [N, K1, D, D])``.

    ``grad [N, K0, K1]``: ``∂/∂Σa_k = Σ_l grad_kl ∂B_kl/∂Σa_k`` and ``∂/∂Σb_l = Σ_k grad_kl ∂B_kl/∂Σb_l`` with the
    per-pair gradients of :func:`pair_gradients`.

    Args:
        support: indices ``(n, k, l)`` (each ``[A]``) of the pairs where ``grad`` may be non-zero, known to the
            caller (e.g. from an optimal plan on the host); default: found from ``grad`` (one host sync).
            Eigenvectors are computed only for these pairs (chunked), unless they are most pairs or the whole
            problem is tiny (:func:`dense_backward`), when all pairs are done at once without indexing.
        sandwiches: the forward's ``M_kl = Laₖᵀ Σb_l Laₖ [N, K0, K1, D, D]`` (``bures_forward(...,
            keep_sandwiches=True)``), instead of forming them again.
    """
    n, k0, k1, d = grad.shape + la.shape[-1:]
    if support is None:
        support = grad.nonzero(as_tuple=True)
    d_a, d_b = torch.zeros_like(la), torch.zeros_like(cb)
    if dense_backward(grad.numel(), support[0].numel(), d):
        pa = cholesky_inverse_transpose(la)
        for s, e in _row_chunks(k0, n * k1 * d * d):
            m = _all_sandwiches(la[:, s:e], cb) if sandwiches is None else sandwiches[:, s:e]
            lam, vec = torch.linalg.eigh(m)
            ga, gb = pair_gradients(*_roots(lam), pa[:, s:e, None] @ vec, la[:, s:e, None] @ vec)
            g = grad[:, s:e, :, None, None]
            d_a[:, s:e] = (g * ga).sum(-3)
            d_b += (g * gb).sum(-4)
        return d_a, d_b
    bi, ki, li = support
    for s, e in _row_chunks(bi.numel(), d * d):
        b, k, l = bi[s:e], ki[s:e], li[s:e]  # noqa: E741
        lak = la[b, k]
        lam, vec = torch.linalg.eigh(_sandwich(lak, cb[b, l]) if sandwiches is None else sandwiches[b, k, l])
        ga, gb = pair_gradients(*_roots(lam), torch.linalg.solve_triangular(lak.mT, vec, upper=True), lak @ vec)
        g = grad[b, k, l][:, None, None]
        d_a.index_put_((b, k), g * ga, accumulate=True)
        d_b.index_put_((b, l), g * gb, accumulate=True)
    return d_a, d_b


class _BuresCost(torch.autograd.Function):
    """Autograd wrapper of :func:`bures_forward` / :func:`bures_backward` (inputs ``ca, cb, la``)."""

    @staticmethod
    def forward(ca: Tensor, cb: Tensor, la: Tensor) -> Tensor:
        return bures_forward(ca, cb, la)[0]

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs[1:])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        return *bures_backward(grad, *ctx.saved_tensors), None


def batch_shape(a: GMM, b: GMM) -> torch.Size:
    """The broadcast batch shape of two mixtures (``RuntimeError`` if they do not broadcast); equal shapes, the
    usual case, skip ``torch.broadcast_shapes`` (tens of µs of Python)."""
    if a.batch_shape == b.batch_shape:
        return a.batch_shape
    return torch.broadcast_shapes(a.batch_shape, b.batch_shape)


def flatten_batch(t: Tensor, bshape: torch.Size, event_dims: int) -> Tensor:
    """Broadcast ``t [*B', *E]`` (``len(E) = event_dims``) to ``[*bshape, *E]`` and flatten to ``[N, *E]``."""
    event = t.shape[t.dim() - event_dims:]
    if t.shape[:t.dim() - event_dims] != bshape:
        t = t.expand(*bshape, *event)
    return t.reshape(-1, *event)


def bures_cost(a: GMM, b: GMM) -> Tensor:
    """Squared Bures distances ``tr Σ_k + tr Σ'_l − 2 tr((Σ_k^½ Σ'_l Σ_k^½)^½)``: ``[*B, K0, K1]``.

    Batch shapes broadcast. Differentiable (first order) in both mixtures' covariances; the backward
    pass computes eigenvectors only for pairs with a non-zero incoming gradient.
    """
    bshape = batch_shape(a, b)
    ca, cb = flatten_batch(a.covariances, bshape, 3), flatten_batch(b.covariances, bshape, 3)
    la = flatten_batch(a.cholesky.detach(), bshape, 3)
    return _BuresCost.apply(ca, cb, la).reshape(*bshape, a.n_components, b.n_components)


def gaussian_w2_cost(a: GMM, b: GMM) -> Tensor:
    """Pairwise squared Gaussian W2 between the components of ``a`` and ``b``: ``[*B, K0, K1]``.

    ``C_kl = ‖m_k − m'_l‖² + tr Σ_k + tr Σ'_l − 2 tr((Σ_k^½ Σ'_l Σ_k^½)^½)``, clamped at 0 against
    rounding. Batch shapes broadcast. Differentiable in means (to any order) and covariances (first
    order), with finite gradients for repeated eigenvalues (see the module docstring).

    Example:
        >>> a = GMM(torch.ones(1), torch.zeros(1, 2), torch.eye(2)[None])
        >>> b = GMM(torch.ones(1), torch.ones(1, 2), 4 * torch.eye(2)[None])
        >>> gaussian_w2_cost(a, b)  # ‖(1,1)‖² + 2 + 8 − 2·4
        tensor([[4.]])
    """
    if a.n_features != b.n_features:
        raise ValueError(f"GMMs must share the dimension D, got D={a.n_features} and D={b.n_features}")
    return w2_cost(squared_mean_distances(a.means, b.means), bures_cost(a, b))


def mean_differences(ma: Tensor, mb: Tensor) -> Tensor:
    """``m_k − m'_l`` for ``ma [..., K0, D]``, ``mb [..., K1, D]``: ``[..., K0, K1, D]``."""
    return ma.unsqueeze(-2) - mb.unsqueeze(-3)


def squared_mean_distances(ma: Tensor, mb: Tensor) -> Tensor:
    """``‖m_k − m'_l‖²`` for ``ma [..., K0, D]``, ``mb [..., K1, D]``: ``[..., K0, K1]``."""
    return mean_differences(ma, mb).square().sum(-1)


def w2_cost(mean_part: Tensor, bures_part: Tensor) -> Tensor:
    """The pairwise Gaussian W2² ``C = ‖m − m'‖² + B`` from its two parts, clamped at 0 against rounding."""
    return (mean_part + bures_part).clamp_min(0.0)


def psd_sqrt(m: Tensor) -> Tensor:
    """Symmetric square root ``V diag(√λ) Vᵀ`` of symmetric PSD ``m [..., D, D]`` (eigenvalues clamped)."""
    lam, vec = torch.linalg.eigh(m)
    return (vec * lam.clamp_min(_eig_floor(lam)).sqrt().unsqueeze(-2)) @ vec.mT


@torch.no_grad()
def gaussian_monge_maps(a: GMM, b: GMM) -> Tensor:
    """Linear parts ``A_kl`` of the Monge maps ``N(m_k, Σ_k) → N(m'_l, Σ'_l)``: ``[*B, K0, K1, D, D]``.

    ``A = Σ^{-½}(Σ^½ Σ' Σ^½)^½ Σ^{-½}``, computed as ``A = L⁻ᵀ (Lᵀ Σ' L)^½ L⁻¹`` with ``Σ = L Lᵀ``
    (the unique symmetric PD matrix with ``A Σ A = Σ'``). The map is ``T(x) = m' + A (x − m)``.
    Computed without gradient.
    """
    prec = a.precision_cholesky.unsqueeze(-3)  # L⁻ᵀ, [*B, K0, 1, D, D]
    la = a.cholesky.unsqueeze(-3)
    root = psd_sqrt(la.mT @ b.covariances.unsqueeze(-4) @ la)
    out = prec @ root @ prec.mT
    return 0.5 * (out + out.mT)


@torch.no_grad()
def bures_barycentre(covariances: Tensor, weights: Tensor, *, init: Tensor | None = None, n_iter: int = 200,
                     tol: float = 1e-12) -> Tensor:
    """W2 barycentre of centred Gaussians: ``argmin_S Σ_j ω_j W2²(N(0, S), N(0, Σ_j))``.

    Args:
        covariances: ``[*B, J, D, D]`` SPD matrices ``Σ_j``.
        weights: ``[*B, J]`` non-negative weights ``ω_j`` summing to one.
        init: ``[*B, D, D]`` starting point (default ``Σ_j ω_j Σ_j``).
        n_iter: maximum number of fixed-point steps; tol: stop when ``‖S⁺ − S‖_F ≤ tol · ‖S‖_F`` (``tol`` is
            raised to ``ROUNDOFF_TOL × eps`` of the dtype, the level at which rounding makes the iterates
            jitter: in float32 a tolerance of 1e-12 was never met and every call ran all ``n_iter`` steps).

    Returns ``[*B, D, D]``. Fixed point of Álvarez-Esteban et al. (2016),
    ``S ← S^{-½} (Σ_j ω_j (S^½ Σ_j S^½)^½)² S^{-½}``, written with ``S = L Lᵀ`` as
    ``S ← L⁻ᵀ R² L⁻¹`` where ``R = Σ_j ω_j (Lᵀ Σ_j L)^½``: the same iterate, no symmetric square root of ``S``.
    """
    s = (weights[..., None, None] * covariances).sum(-3) if init is None else init
    tol = max(tol, ROUNDOFF_TOL * torch.finfo(s.dtype).eps)  # float32 iterates jitter at ~eps: stop there
    for _ in range(n_iter):
        chol = torch.linalg.cholesky(s)
        lu = chol.unsqueeze(-3)
        r = (weights[..., None, None] * psd_sqrt(lu.mT @ covariances @ lu)).sum(-3)
        half = torch.linalg.solve_triangular(chol, r, upper=False, left=False)  # R L⁻¹
        new = half.mT @ half  # (R L⁻¹)ᵀ (R L⁻¹) = L⁻ᵀ R² L⁻¹
        new = 0.5 * (new + new.mT)
        done = (new - s).flatten(-2).norm(dim=-1) <= tol * s.flatten(-2).norm(dim=-1)
        s = new
        if bool(done.all()):
            break
    return s
