"""Additive sufficient statistics of a Gaussian mixture and the chunked E-step that produces them.

For responsibilities ``r_nk``, point weights ``ω_n`` (mask × sample weight) and per-component shifts
``c_k`` (the previous means), the statistics are

    s0_k = Σ_n ω_n r_nk,   s1_k = Σ_n ω_n r_nk (x_n − c_k),   s2_k = Σ_n ω_n r_nk (x_n − c_k)(x_n − c_k)ᵀ,

plus ``Σ_n ω_n log p(x_n)`` and ``Σ_n ω_n``. They add over chunks of points, over devices and over
repeated points, which is why chunking, masks, sample weights and all-reduce share one mechanism.
Shifting by the previous means keeps the covariance ``s2/s0 − δδᵀ`` (``δ = s1/s0``) free of the
cancellation that raw second moments suffer in float32.

Two E-step kernels compute the same statistics:

- *whitened* (any D): ``y_nk = P_kᵀ(x_n − m_k)`` (``P_k = L_k⁻ᵀ``) for all K components by ONE wide GEMM
  ``[X − c, 1] W`` with ``W = [P_1 … P_K; b_1 … b_K]`` and ``b_k = −P_kᵀ(m_k − c)`` (``c`` a centre of the points,
  so that the GEMM works on centred values; the bias is its last input row, so there is neither a ``[K, N, D]``
  copy of the centred data nor a bias pass), ``log N = −½(‖y‖² + log|Σ| + D log 2π)``. The statistics are two
  more GEMMs: ``Σ_n r_nk [x_n − c, 1]`` (``rᵀ[X − c, 1]``, K rows: it gives ``s0_k`` and
  ``s1_k = Σ r (x − c) − s0_k (m_k − c)``) and the whitened second moments ``G_k = Σ_n r_nk y_nk y_nkᵀ`` (one GEMM
  batched over the components), mapped back once per step by ``s2_k = L_k G_k L_kᵀ``. Cost ``≈ 4·K·N·D²`` flops
  per step, in GEMMs whose output widths are multiples of ``D`` (a ``D+1``-wide Gram runs at 60% of the
  ``D``-wide one on AVX-512).
- *quadratic features* (``D ≤ SMALL_D``): with ``φ(x) = [vec(x̃x̃ᵀ), x̃, 1]`` (``x̃ = x − centre``) the
  log-densities of all components are one GEMM ``φ(X) W`` with natural parameters ``W`` (``−½Λ``, ``Λm̃``,
  constants) and the statistics are one GEMM ``rᵀφ(X)``. Both GEMMs run in float64, which removes the
  cancellation of the expanded quadratic form; for small D that costs little and avoids the
  inefficiency of ``D×D`` GEMMs with tiny D (colour fits, D=3, are about 5× faster this way).

The points' side of each kernel's first GEMM, ``[X − c, 1]`` or ``φ(X)`` about the weighted mean of the points,
does not change during a fit: :func:`point_features` builds it once per fit (up to ``FEATURE_CACHE_BYTES``).

In place, when autograd does not record the E-step (``grad="none"`` fits, every step but the last of the
``"one_step"`` and ``"implicit"`` modes, ``torch.no_grad()``) and the caller passes a :class:`Workspace`: every
per-chunk temporary is a workspace buffer, allocated in the first chunk of a fit and reused by every chunk of
every step. The exponentials overwrite the log-densities and the responsibilities the exponentials; the
whitened kernel scales ``y`` in place by ``√(ω r)``, so that ``G_k`` is the Gram matrix of a single buffer.
When autograd records, the same formulas run out of place (with ``G_k = Σ (ω r y) yᵀ``, since ``√r`` has an
infinite derivative at ``r = 0``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from .gmm import GMM, LOG_2PI

__all__ = ["SuffStats", "QuadFeatures", "WhitenedFeatures", "Workspace", "point_features", "quad_point_features",
           "whitened_point_features", "quad_stats_about", "accumulate_stats", "e_step", "stats_from_resp",
           "responsibility_stats", "chunk_bounds"]

SMALL_D = 6  # largest dimension that uses the quadratic-feature kernel
FEATURE_CACHE_BYTES = 256 << 20  # largest per-fit features (φ(X), [X − c, 1]); beyond, built per chunk
QUAD_CHUNK_SCALE = 4  # the quadratic kernel's temporaries are D-times smaller: use larger chunks
DENORMAL_MARGIN = 30.0  # responsibilities below tiny·e^30 (relative to the largest) are exactly zero

# Elements of one [*B, K, n, D] temporary per chunk (4 MiB in float32): small enough to stay in cache
# and to be recycled by the allocator, large enough that per-chunk overhead is negligible.
CHUNK_ELEMENTS = 1 << 20
# The whitened kernel's y [n, *B, K, D] per chunk: the GEMMs that write and read it run fastest when it stays
# in a core's L2 cache (1 MiB in float32; 2¹⁹ or 2²⁰ elements were 10-15% slower at D=48, K=8).
WHITENED_CHUNK_ELEMENTS = 1 << 18


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

    def __add__(self, other: SuffStats) -> SuffStats:
        return SuffStats(self.s0 + other.s0, self.s1 + other.s1, self.s2 + other.s2,
                         self.log_lik + other.log_lik, self.total + other.total, self.shift)


class Workspace:
    """Scratch tensors of the E-step kernels, kept for all chunks and steps of one fit.

    :meth:`take` returns a tensor of the requested shape that views the front of a flat buffer stored under
    ``name``; the buffer is (re)allocated only when it is missing, too small, or of another dtype or device. A
    fit thus allocates its E-step scratch once, in its first chunk, instead of in every chunk of every step
    (and the views are memoised: a chunk loop of small ops pays for a dictionary look-up, not for building
    views). Contents on return are whatever the previous user left. The kernels use a workspace only while
    autograd does not record them (see the module docstring); results returned to callers never view its
    buffers.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}
        self._views: dict[tuple, Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (name, tuple(shape), dtype, device)
        view = self._views.get(key)
        if view is None:
            numel = math.prod(shape)
            buf = self._buffers.get(name)
            if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
                buf = self._buffers[name] = torch.empty(numel, dtype=dtype, device=device)
                self._views = {k: v for k, v in self._views.items() if k[0] != name}
            view = self._views[key] = buf[:numel].view(shape)
        return view


def _scratch(ws: Workspace | None, name: str, shape: tuple[int, ...], like: Tensor,
             dtype: torch.dtype | None = None) -> Tensor | None:
    """The ``out=`` argument of a kernel step: workspace buffer ``name``, or ``None`` (allocate) without one."""
    return None if ws is None else ws.take(name, shape, like.dtype if dtype is None else dtype, like.device)


def _inplace(ws: Workspace | None, t: Tensor) -> Tensor | None:
    """The ``out=`` argument of a step that overwrites ``t`` when working in place (``None``: out of place)."""
    return None if ws is None else t


def _records_tensors(*tensors: Tensor | None) -> bool:
    """Whether autograd records operations on ``tensors`` (then nothing may be written in place)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _records(gmm: GMM, *tensors: Tensor | None) -> bool:
    """Whether autograd records an E-step of ``gmm`` on ``tensors``."""
    return _records_tensors(gmm.weights, gmm.means, gmm.covariances, *tensors)


def chunk_bounds(n: int, batch: int, k: int, d: int, chunk_size: int | None) -> list[tuple[int, int]]:
    """Split ``range(n)`` into chunks whose ``[batch, k, chunk, d]`` temporaries hold ~CHUNK_ELEMENTS."""
    if chunk_size is None:
        chunk_size = max(16, CHUNK_ELEMENTS // max(1, batch * k * d))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


def stats_from_resp(diff: Tensor, rw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(Σ rw, Σ rw·diff, Σ rw·diff diffᵀ)`` over points, for centred points ``diff [*B, K, n, D]`` and
    weighted responsibilities ``rw [*B, K, n]``; returns ``[*B, K]``, ``[*B, K, D]``, ``[*B, K, D, D]``."""
    s0 = rw.sum(-1)
    s1 = (rw.unsqueeze(-2) @ diff).squeeze(-2)
    s2 = (diff * rw.unsqueeze(-1)).mT @ diff
    return s0, s1, s2


def responsibility_stats(x: Tensor, log_resp: Tensor, shift: Tensor, sample_weight: Tensor | None = None) -> SuffStats:
    """The statistics :func:`imgmw.m_step` takes, from points and responsibilities (no chunking; for use
    outside the fit loop, e.g. ``m_step(responsibility_stats(x, e_step(gmm, x)[0], gmm.means), gmm)``).

    ``x [*B, N, D]``, ``log_resp [*B, N, K]`` (log responsibilities, as :func:`e_step` returns them), ``shift
    [*B, K, D]`` (the means of the GMM passed to ``m_step`` as ``prev``), optional ``sample_weight [*B, N]``:
    ``s0 = Σ ω r``, ``s1 = Σ ω r (x − shift)``, ``s2 = Σ ω r (x − shift)(x − shift)ᵀ``; ``log_lik`` is 0 (the
    likelihood is not known from responsibilities alone).
    """
    w = torch.ones(x.shape[:-1], dtype=x.dtype, device=x.device) if sample_weight is None else sample_weight
    rw = log_resp.exp().mT * w.unsqueeze(-2)                   # [*B, K, N]
    s0, s1, s2 = stats_from_resp(x.unsqueeze(-3) - shift.unsqueeze(-2), rw)
    total = w.sum(-1)
    return SuffStats(s0, s1, s2, torch.zeros_like(total), total, shift)


def _normalise(logp: Tensor, dim: int, ws: Workspace | None, keep: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``(log_norm, e, total)`` along ``dim`` (kept as a size-1 dim) with ONE ``exp``: ``e = exp(logp − top)``,
    ``total = Σ e``, ``log_norm = top + log total = log Σ exp(logp)``; the responsibilities are ``e / total``.

    ``top`` is the (detached) maximum: the shift is exact for the value and its gradient. Terms below
    ``tiny · e^DENORMAL_MARGIN`` relative to the largest are set to exactly zero: they are below the dtype's
    resolution of the sums they enter (1e-25 against float32's 1e-7), but their products in the statistics and
    in the backward pass would be subnormal numbers, on which CPU arithmetic is several times slower (a texture
    synthesis ran 1.6× slower once a few components had such responsibilities). The ``exp`` never sees such
    arguments either (nor ``−∞``): those with subnormal or zero results take a slow path of the vectorised
    ``exp``, ten to a hundred times slower. So the shifted log-densities are clamped one unit below the cut,
    and the exponentials at or below ``exp(cut)`` (all the clamped ones) are then set to zero. With a workspace
    ``e`` overwrites ``logp`` (unless ``keep``: then a buffer of the workspace).
    """
    axis = dim % logp.dim()
    shape = (*logp.shape[:axis], 1, *logp.shape[axis + 1:])
    cut = math.log(torch.finfo(logp.dtype).tiny) + DENORMAL_MARGIN
    top = torch.amax(logp.detach(), dim, keepdim=True, out=_scratch(ws, "top", shape, logp))
    z = torch.sub(logp, top, out=_scratch(ws, "e", tuple(logp.shape), logp) if keep else _inplace(ws, logp))
    z = torch.clamp_min(z, cut - 1.0, out=_inplace(ws, z))
    e = torch.threshold(torch.exp(z, out=_inplace(ws, z)), math.exp(cut), 0.0, out=_inplace(ws, z))
    total = torch.sum(e, dim, keepdim=True, out=_scratch(ws, "total", shape, logp))
    log_norm = torch.log(total, out=_scratch(ws, "log_norm", shape, logp))
    return torch.add(log_norm, top, out=_inplace(ws, log_norm)), e, total


def _weighted_resp(e: Tensor, total: Tensor, w: Tensor | None, ws: Workspace | None,
                   dtype: torch.dtype) -> Tensor:
    """``ω r = e · (ω / total)`` in ``dtype`` (``w``: point weights broadcasting like ``total``, or ``None``).
    With a workspace ``total`` is overwritten and the result overwrites ``e`` (or a buffer of ``dtype``)."""
    out = _inplace(ws, total)
    scale = torch.reciprocal(total, out=out) if w is None else torch.div(w, total, out=out)
    out = _inplace(ws, e) if dtype == e.dtype else _scratch(ws, "rw", tuple(e.shape), e, dtype)
    return torch.mul(e, scale, out=out).to(dtype)


def _add_log_lik(acc: Tensor, log_norm: Tensor, w: Tensor | None, ws: Workspace | None) -> Tensor:
    """``acc [Bf] + Σ_n ω_n log p(x_n)`` over a chunk, for ``log_norm`` and ``w`` (or ``None``) ``[Bf, 1, n]``."""
    if w is not None:
        log_norm = torch.mul(log_norm, w, out=_inplace(ws, log_norm))
    part = torch.sum(log_norm, (1, 2), out=_scratch(ws, "log_lik", tuple(acc.shape), acc))
    return torch.add(acc, part, out=_inplace(ws, acc))


def _first_moment_about(u: Tensor, s0: Tensor, offset: Tensor) -> Tensor:
    """``s1 = Σ r (x − c − offset) = u − s0·offset`` from ``u = Σ r (x − c) [*B, K, D]``, ``s0 [*B, K]``."""
    return u - s0.unsqueeze(-1) * offset


def _whitened_setup(gmm: GMM, features: WhitenedFeatures | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Per-step constants of the whitened kernel.

    Returns ``centre [*B, D]`` (subtracted from the points so that the GEMM works on centred values: the cached
    features' centre, else the detached mixture mean), ``w_aug [Bf, D+1, K·D]`` (``P_1 … P_K`` side by side over
    the row of biases ``−(m_k − centre)ᵀ P_k``), ``const [Bf, K, 1]`` (``log w_k − ½ log|Σ_k| − ½ D log 2π``;
    ``Bf = prod(*B)``) and the cached ``[X − centre, 1]`` or ``None``.
    """
    k, d = gmm.n_components, gmm.n_features
    centre = _quad_centre(gmm) if features is None else features.centre
    prec = gmm.precision_cholesky
    p_cat = prec.movedim(-3, -2).reshape(-1, d, k * d)
    bias = -((gmm.means - centre.unsqueeze(-2)).unsqueeze(-2) @ prec).reshape(-1, 1, k * d)
    const = gmm.weights.log() - 0.5 * (gmm.log_det_covariances + d * LOG_2PI)
    cached = None if features is None else features.xh
    return centre, torch.cat([p_cat, bias], dim=-2), const.reshape(-1, k, 1), cached


def _whitened_chunk(x: Tensor, xh: Tensor | None, centre: Tensor, w_aug: Tensor, const: Tensor,
                    ws: Workspace | None) -> tuple[Tensor, Tensor, Tensor]:
    """Whitened kernel for the chunk ``x [*B, n, D]``: ``(xh [Bf, n, D+1], y [n, Bf, K, D], logp [Bf, K, n])``
    with ``xh = [x − centre, 1]`` (its cached rows, or ``None`` to build them), ``y_nk = (x_n − m_k)ᵀ P_k`` from
    ONE GEMM ``xh · w_aug`` and ``logp = const − ½‖y‖²`` (joint ``log w_k + log N``). Points are the outer
    dimension of ``y``, so that the components of all batch elements form one batch of the statistics GEMM,
    and the inner one of ``logp``, so that sums and maxima over components run along contiguous rows (as in
    the quadratic kernel)."""
    bshape, n, d = x.shape[:-2], x.shape[-2], x.shape[-1]
    bf, k = w_aug.shape[0], const.shape[-2]
    if xh is None:
        xh = whitened_point_features(x, centre, out=_scratch(ws, "xh", (*bshape, n, d + 1), x))
    xh = xh.reshape(bf, n, d + 1)
    if ws is None:
        y = torch.bmm(xh, w_aug).transpose(0, 1).unflatten(-1, (k, d))
        norm = torch.linalg.vector_norm(y, dim=-1).permute(1, 2, 0)
    else:
        y = ws.take("y", (n, bf, k * d), x.dtype, x.device)
        torch.bmm(xh, w_aug, out=y.transpose(0, 1))
        y = y.unflatten(-1, (k, d))
        norm = ws.take("logp", (bf, k, n), x.dtype, x.device)
        torch.linalg.vector_norm(y, dim=-1, out=norm.permute(2, 0, 1))
    return xh, y, torch.addcmul(const, norm, norm, value=-0.5, out=_inplace(ws, norm))


def _whitened_accumulate(u: Tensor, g: Tensor, xh: Tensor, y: Tensor, rw: Tensor,
                         ws: Workspace | None) -> tuple[Tensor, Tensor]:
    """``u [Bf, K, D+1] += Σ_n ωr·xh`` and ``g [Bf·K, D, D] += Σ_n ωr·y yᵀ`` over the chunk, for the weighted
    responsibilities ``rw [Bf, K, n]`` (overwritten by ``√(ωr)`` with a workspace, and ``y`` by ``√(ωr)·y``).

    The square root is taken as ``rsqrt(1 / ωr)``: exact zeros (most responsibilities of separated components)
    send ``sqrt`` down a slow path of the vectorised math library, three times slower than both of these."""
    n, bf, k, d = y.shape
    u = torch.baddbmm(u, rw, xh, out=_inplace(ws, u))
    rw = rw.permute(2, 0, 1).unsqueeze(-1)
    if ws is None:
        a, b = y * rw, y
    else:
        a = b = y.mul_(rw.reciprocal_().rsqrt_())
    a, b = a.reshape(n, bf * k, d), b.reshape(n, bf * k, d)
    return u, torch.baddbmm(g, a.permute(1, 2, 0), b.transpose(0, 1), out=_inplace(ws, g))


def quad_point_features(x: Tensor, centre: Tensor, out: Tensor | None = None) -> Tensor:
    """``φ(x) = [vec(x̃x̃ᵀ), x̃, 1]`` in float64 for ``x [*B, n, D]``, ``centre [*B, D]``: ``[*B, n, D²+D+1]``.

    Unless autograd records, φ is written in place into ``out`` (allocated when ``None``), without temporaries.
    """
    d = x.shape[-1]
    if out is None:
        if _records_tensors(x, centre):
            xt = x.double() - centre.double().unsqueeze(-2)
            outer = (xt.unsqueeze(-1) * xt.unsqueeze(-2)).flatten(-2)
            return torch.cat([outer, xt, torch.ones_like(xt[..., :1])], dim=-1)
        out = x.new_empty(*x.shape[:-1], d * d + d + 1, dtype=torch.float64)
    xt = out[..., d * d:d * d + d].copy_(x).sub_(centre.double().unsqueeze(-2))
    torch.mul(xt.unsqueeze(-1), xt.unsqueeze(-2), out=out[..., :d * d].unflatten(-1, (d, d)))
    out[..., -1].fill_(1.0)
    return out


def _natural_params(gmm: GMM, centre: Tensor) -> Tensor:
    """``W [*B, F, K]`` (float64) with ``φ(x)ᵀW_k = log w_k + log N(x | m_k, Σ_k)``.

    ``log N = −½ x̃ᵀΛx̃ + x̃ᵀΛm̃ − ½ m̃ᵀΛm̃ − ½ log|Σ| − ½ D log 2π`` with ``Λ = Σ⁻¹ = PPᵀ`` and
    ``m̃ = m − centre``.
    """
    d = gmm.n_features
    prec_chol = gmm.precision_cholesky.double()
    lam = prec_chol @ prec_chol.mT
    mt = gmm.means.double() - centre.double().unsqueeze(-2)
    lin = (lam @ mt.unsqueeze(-1)).squeeze(-1)
    const = (-0.5 * (mt.unsqueeze(-2) @ prec_chol).squeeze(-2).square().sum(-1)
             - 0.5 * gmm.log_det_covariances.double() - 0.5 * d * LOG_2PI + gmm.weights.double().log())
    return torch.cat([-0.5 * lam.flatten(-2), lin, const.unsqueeze(-1)], dim=-1).mT


def quad_stats_about(s: Tensor, d: int, shift: Tensor, centre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Statistics about ``shift [*B,K,D]`` from ``s = Σ r φ(x) [*B, K, F]`` (features about ``centre``).

    With ``u = Σ r x̃``, ``V = Σ r x̃x̃ᵀ`` and ``c̃ = shift − centre``:
    ``s1 = u − s0 c̃`` and ``s2 = V − u c̃ᵀ − c̃ uᵀ + s0 c̃ c̃ᵀ`` (float64, so the subtraction is exact enough).
    """
    v = s[..., :d * d].unflatten(-1, (d, d))
    u, s0 = s[..., d * d:d * d + d], s[..., -1]
    c = shift.double() - centre.double().unsqueeze(-2)
    uc = u.unsqueeze(-1) * c.unsqueeze(-2)
    s2 = v - uc - uc.mT + s0[..., None, None] * (c.unsqueeze(-1) * c.unsqueeze(-2))
    return s0, _first_moment_about(u, s0, c), s2


def _quad_centre(gmm: GMM) -> Tensor:
    """Expansion point of the features when none is cached: the mixture mean ``Σ w_k m_k [*B, D]``
    (detached: the statistics do not depend on it mathematically, so its gradient is exactly zero)."""
    return (gmm.weights.unsqueeze(-1) * gmm.means).sum(-2).detach()


def whitened_point_features(x: Tensor, centre: Tensor, out: Tensor | None = None) -> Tensor:
    """``[x − centre, 1]`` for ``x [*B, n, D]``, ``centre [*B, D]``: ``[*B, n, D+1]``, the left operand of the
    whitened kernel's GEMM (written in place into ``out``, allocated when ``None``, unless autograd records)."""
    if out is None:
        if _records_tensors(x, centre):
            return torch.cat([x - centre.unsqueeze(-2), torch.ones_like(x[..., :1])], dim=-1)
        out = x.new_empty(*x.shape[:-1], x.shape[-1] + 1)
    torch.sub(x, centre.unsqueeze(-2), out=out[..., :-1])
    out[..., -1].fill_(1.0)
    return out


@dataclass
class QuadFeatures:
    """Per-fit cache of the quadratic-feature kernel: expansion point ``centre [*B, D]`` and
    ``phi = φ(X) [*B, N, D²+D+1]`` (float64). ``X`` does not change during a fit, so ``φ`` is built once."""

    centre: Tensor
    phi: Tensor


@dataclass
class WhitenedFeatures:
    """Per-fit cache of the whitened kernel: ``centre [*B, D]`` and ``xh = [X − centre, 1] [*B, N, D+1]``
    (:func:`whitened_point_features`), built once instead of per chunk and step."""

    centre: Tensor
    xh: Tensor


def point_features(x: Tensor, weight: Tensor | None = None) -> QuadFeatures | WhitenedFeatures | None:
    """The per-fit features of ``x [*B, N, D]`` for the kernel that handles its ``D``, about the weighted mean
    of the points: :class:`QuadFeatures` (``D ≤ SMALL_D``) or :class:`WhitenedFeatures`; ``None`` when they
    would exceed ``FEATURE_CACHE_BYTES`` (the kernels then build them per chunk)."""
    d = x.shape[-1]
    quad = d <= SMALL_D
    width, itemsize = (d * d + d + 1, 8) if quad else (d + 1, x.element_size())
    if x[..., 0].numel() * width * itemsize > FEATURE_CACHE_BYTES:
        return None
    xd = x.detach()
    if weight is None:
        centre = xd.mean(-2)
    else:
        w = weight.detach()
        centre = (w.unsqueeze(-2) @ xd).squeeze(-2) / w.sum(-1, keepdim=True)
    if quad:
        return QuadFeatures(centre, quad_point_features(x, centre))
    return WhitenedFeatures(centre, whitened_point_features(x, centre))


def _quad_chunk(x: Tensor, phi: Tensor | None, w_nat: Tensor, centre: Tensor,
                ws: Workspace | None) -> tuple[Tensor, Tensor]:
    """Quadratic-feature kernel: ``(φ [Bf,n,F] float64, logp [Bf,K,n] in x's dtype)`` for the chunk
    ``x [*B, n, D]`` (``phi``: its cached features, or ``None`` to build them; ``w_nat [Bf, F, K]``). The GEMM is
    written ``Wᵀφᵀ`` (``[K, n]`` output): for these thin shapes that is about twice as fast as ``φW``."""
    bf, f, k = w_nat.shape
    n = x.shape[-2]
    if phi is None:
        phi = quad_point_features(x, centre, out=_scratch(ws, "phi", (*x.shape[:-1], f), x, torch.float64))
    phi = phi.reshape(bf, n, f)
    logp = torch.bmm(w_nat.mT, phi.mT, out=_scratch(ws, "logp64", (bf, k, n), x, torch.float64))
    if ws is None or logp.dtype == x.dtype:
        return phi, logp.to(x.dtype)
    return phi, ws.take("logp", (bf, k, n), x.dtype, x.device).copy_(logp)


def _quad_setup(gmm: GMM, features: QuadFeatures | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(centre [*B, D] float64, w_nat [Bf, F, K], cached φ or None)`` of the quadratic kernel for one step."""
    centre = (_quad_centre(gmm) if features is None else features.centre).double()
    w_nat = _natural_params(gmm, centre)
    return centre, w_nat.reshape(-1, *w_nat.shape[-2:]), None if features is None else features.phi


def _chunks(gmm: GMM, n: int, quad: bool, chunk_size: int | None) -> list[tuple[int, int]]:
    batch, k, d = math.prod(gmm.batch_shape), gmm.n_components, gmm.n_features
    if chunk_size is None:
        if quad:
            width = d * d + d + 1 + k  # float64 φ and the [n, K] log-densities per point
            chunk_size = max(16, QUAD_CHUNK_SCALE * CHUNK_ELEMENTS // max(1, batch * width))
        else:
            chunk_size = max(16, WHITENED_CHUNK_ELEMENTS // max(1, batch * k * d))
    return chunk_bounds(n, batch, k, d, chunk_size)


def accumulate_stats(gmm: GMM, x: Tensor, weight: Tensor | None = None, chunk_size: int | None = None,
                     features: QuadFeatures | WhitenedFeatures | None = None,
                     workspace: Workspace | None = None) -> SuffStats:
    """E-step fused with the accumulation of sufficient statistics, chunked over points.

    Args:
        gmm: current parameters, batch ``*B``.
        x: ``[*B, N, D]`` points (entries with zero weight must be finite; callers zero them).
        weight: ``[*B, N]`` non-negative point weights ``ω_n`` or ``None`` for all ones.
        chunk_size: points per chunk (default: temporaries of about 2²⁰ elements, 2¹⁸ for the whitened ``y``).
        features: the fit's cached :func:`point_features` of ``x`` (built per chunk if None).
        workspace: scratch buffers for the in-place kernels, used when autograd does not record this call
            (module docstring); ``None`` allocates per chunk.

    Never stores responsibilities: memory is ``O(B·K·chunk·D + B·K·D²)`` beyond the inputs. Sums over chunks
    accumulate in place; the kernels' GEMMs (see the module docstring) yield ``s0``, ``s1`` about the previous
    means and, for the whitened kernel, ``s2_k = L_k G_k L_kᵀ``.
    """
    d, k, bshape = gmm.n_features, gmm.n_components, gmm.batch_shape
    bf = math.prod(bshape)
    quad = d <= SMALL_D
    if quad:
        centre, w_nat, cached = _quad_setup(gmm, cast(QuadFeatures | None, features))
        s = x.new_zeros(bf, k, w_nat.shape[-2], dtype=torch.float64)
    else:
        centre, w_aug, const, cached = _whitened_setup(gmm, cast(WhitenedFeatures | None, features))
        u, g = x.new_zeros(bf, k, d + 1), x.new_zeros(bf * k, d, d)
    ws = None if workspace is None or _records(gmm, x, weight, cached) else workspace
    log_lik = x.new_zeros(bf)
    for lo, hi in _chunks(gmm, x.shape[-2], quad, chunk_size):
        xc = x[..., lo:hi, :]
        wc = None if weight is None else weight[..., lo:hi].reshape(bf, 1, hi - lo)
        fc = None if cached is None else cached[..., lo:hi, :]
        if quad:
            phi, logp = _quad_chunk(xc, fc, w_nat, centre, ws)
            log_norm, e, total = _normalise(logp, -2, ws)  # [Bf, 1, n]
            s = torch.baddbmm(s, _weighted_resp(e, total, wc, ws, torch.float64), phi, out=_inplace(ws, s))
        else:
            xh, y, logp = _whitened_chunk(xc, fc, centre, w_aug, const, ws)
            log_norm, e, total = _normalise(logp, -2, ws)  # [Bf, 1, n]
            u, g = _whitened_accumulate(u, g, xh, y, _weighted_resp(e, total, wc, ws, x.dtype), ws)
        log_lik = _add_log_lik(log_lik, log_norm, wc, ws)
    total = (torch.full(bshape, x.shape[-2], dtype=x.dtype, device=x.device) if weight is None
             else weight.sum(-1))
    if quad:
        s0, s1, s2 = (t.to(x.dtype) for t in quad_stats_about(s.reshape(*bshape, k, -1), d, gmm.means, centre))
    else:
        u = u.reshape(*bshape, k, d + 1)
        s0 = u[..., d]
        s1 = _first_moment_about(u[..., :d], s0, gmm.means - centre.unsqueeze(-2))
        chol = gmm.cholesky
        s2 = chol @ g.reshape(*bshape, k, d, d) @ chol.mT
    return SuffStats(s0, s1, s2, log_lik.reshape(bshape), total, gmm.means)


def e_step(gmm: GMM, x: Tensor, chunk_size: int | None = None,
           features: QuadFeatures | WhitenedFeatures | None = None,
           workspace: Workspace | None = None) -> tuple[Tensor, Tensor]:
    """Responsibilities in the log domain.

    Args:
        gmm: parameters with batch ``*B``.
        x: ``[*B, N, D]`` points.
        chunk_size, features: as in :func:`accumulate_stats`.
        workspace: scratch of the in-place kernels (a fit's, or a new one when autograd does not record).

    Returns:
        ``(log_resp [*B, N, K], log_prob [*B, N])`` with ``log_resp_nk = log w_k + log N(x_n|m_k,Σ_k) −
        log p(x_n)`` and ``log_prob_n = log p(x_n)`` (log-sum-exp over components). Without autograd both are
        written chunk by chunk into their final tensors, and nothing else of size N is allocated.
    """
    gmm.validate_points(x)
    gmm.check_cholesky()
    d, k, bshape = gmm.n_features, gmm.n_components, gmm.batch_shape
    bf = math.prod(bshape)
    quad = d <= SMALL_D
    if quad:
        centre, w_nat, cached = _quad_setup(gmm, cast(QuadFeatures | None, features))
    else:
        centre, w_aug, const, cached = _whitened_setup(gmm, cast(WhitenedFeatures | None, features))
    ws = None if _records(gmm, x, cached) else workspace or Workspace()
    resp, norms = [], []
    out = None if ws is None else x.new_empty(*x.shape[:-1], k)
    log_prob = None if ws is None else x.new_empty(x.shape[:-1])
    for lo, hi in _chunks(gmm, x.shape[-2], quad, chunk_size):
        xc = x[..., lo:hi, :]
        fc = None if cached is None else cached[..., lo:hi, :]
        if quad:
            logp = _quad_chunk(xc, fc, w_nat, centre, ws)[1]
        else:
            logp = _whitened_chunk(xc, fc, centre, w_aug, const, ws)[2]
        log_norm = _normalise(logp, -2, ws, keep=True)[0]
        logp, log_norm = logp.mT, log_norm.mT  # [Bf, n, K], [Bf, n, 1]
        if ws is None:
            resp.append((logp - log_norm).reshape(*bshape, hi - lo, k))
            norms.append(log_norm.reshape(*bshape, hi - lo))
        else:
            assert out is not None and log_prob is not None
            torch.sub(logp, log_norm, out=out[..., lo:hi, :].view(bf, hi - lo, k))
            log_prob[..., lo:hi].view(bf, hi - lo, 1).copy_(log_norm)
    if ws is None:
        return torch.cat(resp, dim=-2), torch.cat(norms, dim=-1)
    assert out is not None and log_prob is not None
    return out, log_prob
