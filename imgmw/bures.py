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
incoming gradient is non-zero: under an optimal-transport plan at most ``K0 + K1 − 1`` of ``K0·K1``.

Also here: the affine Gaussian Monge maps between all component pairs and the fixed-point Gaussian
W2 barycentre of covariances, both without gradient.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .gmm import GMM

__all__ = ["gaussian_w2_cost", "bures_cost", "bures_forward", "bures_backward", "flatten_batch", "psd_sqrt",
           "gaussian_monge_maps", "bures_barycentre", "ROUNDOFF_TOL"]

# Elements of the D×D matrices formed at once by the pairwise trace term.
PAIR_CHUNK_ELEMENTS = 1 << 22
# Below this many elements (pairs × D²) the backward does every pair at once instead of the support only.
DENSE_BACKWARD_ELEMENTS = 1 << 12
# Fixed-point iterations (barycentres) stop at latest when a relative change is below this many dtype eps.
ROUNDOFF_TOL = 16


def _eig_floor(lam: Tensor) -> Tensor:
    """``[..., 1]`` floor ``eps · λ_max`` (at least the dtype's ``tiny``) for eigenvalues ``lam [..., D]``."""
    info = torch.finfo(lam.dtype)
    return (lam[..., -1:].clamp_min(info.tiny) * info.eps).clamp_min(info.tiny)


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


def bures_forward(ca: Tensor, cb: Tensor, la: Tensor) -> Tensor:
    """Squared Bures distances ``B_kl = tr Σa_k + tr Σb_l − 2 tr((Laₖᵀ Σb_l Laₖ)^½)``: ``[N, K0, K1]``.

    Flat batch ``N``: ``ca [N, K0, D, D]``, ``cb [N, K1, D, D]``, ``la [N, K0, D, D]`` with ``Σa = La Laᵀ``.
    Eigenvalues only, chunked over ``k`` so that at most ``PAIR_CHUNK_ELEMENTS`` entries of the
    ``M_kl = Laₖᵀ Σb_l Laₖ`` exist at once. No autograd (callers wrap it with :func:`bures_backward`).
    """
    n, k0, k1, d = ca.shape[0], ca.shape[-3], cb.shape[-3], ca.shape[-1]
    cross = ca.new_empty(n, k0, k1)
    for s, e in _row_chunks(k0, n * k1 * d * d):
        lam = torch.linalg.eigvalsh(_all_sandwiches(la[:, s:e], cb))
        cross[:, s:e] = lam.clamp_min(_eig_floor(lam)).sqrt().sum(-1)
    trace_a = ca.diagonal(dim1=-2, dim2=-1).sum(-1)
    trace_b = cb.diagonal(dim1=-2, dim2=-1).sum(-1)
    return trace_a.unsqueeze(-1) + trace_b.unsqueeze(-2) - 2.0 * cross


def bures_backward(grad: Tensor, cb: Tensor, la: Tensor, pa: Tensor) -> tuple[Tensor, Tensor]:
    """Vector-Jacobian product of :func:`bures_forward`: ``(∂/∂Σa [N, K0, D, D], ∂/∂Σb [N, K1, D, D])``.

    ``grad [N, K0, K1]``; ``pa = La⁻ᵀ``. With ``T_kl = tr(M_kl^½)`` and ``M = V diag(λ) Vᵀ``,

        ∂T/∂Σa = ½ Pa M^½ Paᵀ  (half the Monge map Σa → Σb),   ∂T/∂Σb = ½ La M^{-½} Laᵀ,

    with ``1/√λ`` set to zero below the eigenvalue floor (the derivative of the clamp). Eigenvectors are
    computed only for the pairs with a non-zero ``grad`` (chunked); when those are most pairs, or the
    whole problem is tiny, all pairs are done at once without indexing.
    """
    n, k0, k1, d = grad.shape + la.shape[-1:]
    eye = torch.eye(d, dtype=la.dtype, device=la.device)
    grad_b = grad.sum(-2)[..., None, None] * eye
    half_a = torch.zeros_like(la)  # Σ_l g_kl M_kl^½, mapped through Pa at the end
    n_active = int(torch.count_nonzero(grad))
    if 2 * n_active >= grad.numel() or grad.numel() * d * d <= DENSE_BACKWARD_ELEMENTS:
        for s, e in _row_chunks(k0, n * k1 * d * d):
            terms_a, terms_b = _bures_vjp_terms(grad[:, s:e], _all_sandwiches(la[:, s:e], cb), la[:, s:e, None])
            half_a[:, s:e] = terms_a.sum(-3)
            grad_b = grad_b + terms_b.sum(-4)
    else:
        bi, ki, li = grad.nonzero(as_tuple=True)
        for s, e in _row_chunks(n_active, la.shape[-1] ** 2):
            b, k, l = bi[s:e], ki[s:e], li[s:e]  # noqa: E741
            lak = la[b, k]
            terms_a, terms_b = _bures_vjp_terms(grad[b, k, l], _sandwich(lak, cb[b, l]), lak)
            half_a.index_put_((b, k), terms_a, accumulate=True)
            grad_b.index_put_((b, l), terms_b, accumulate=True)
    return grad.sum(-1)[..., None, None] * eye - pa @ half_a @ pa.mT, grad_b


def _bures_vjp_terms(g: Tensor, m: Tensor, la: Tensor) -> tuple[Tensor, Tensor]:
    """Per pair: ``g M^½`` and ``−g La M^{-½} Laᵀ`` for weights ``g [...]``, ``m [..., D, D]``, ``la`` (broadcast)."""
    lam, vec = torch.linalg.eigh(m)
    floor = _eig_floor(lam)
    root = lam.clamp_min(floor).sqrt()
    inv_root = torch.where(lam >= floor, root.reciprocal(), torch.zeros_like(root))
    g = g.unsqueeze(-1)
    w = la @ vec
    return (vec * (g * root).unsqueeze(-2)) @ vec.mT, (w * (-g * inv_root).unsqueeze(-2)) @ w.mT


class _BuresCost(torch.autograd.Function):
    """Autograd wrapper of :func:`bures_forward` / :func:`bures_backward` (inputs ``ca, cb, la, pa``)."""

    @staticmethod
    def forward(ca: Tensor, cb: Tensor, la: Tensor, pa: Tensor) -> Tensor:
        return bures_forward(ca, cb, la)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs[1:])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        return *bures_backward(grad, *ctx.saved_tensors), None, None


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
    bshape = torch.broadcast_shapes(a.batch_shape, b.batch_shape)
    ca, cb = flatten_batch(a.covariances, bshape, 3), flatten_batch(b.covariances, bshape, 3)
    la = flatten_batch(a.cholesky.detach(), bshape, 3)
    pa = flatten_batch(a.precision_cholesky.detach(), bshape, 3)
    return _BuresCost.apply(ca, cb, la, pa).reshape(*bshape, a.n_components, b.n_components)


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
    means = (a.means.unsqueeze(-2) - b.means.unsqueeze(-3)).square().sum(-1)
    return (means + bures_cost(a, b)).clamp_min(0.0)


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
