"""Additive sufficient statistics of a Gaussian mixture and the chunked E-step that produces them.

For responsibilities ``r_nk``, point weights ``ω_n`` (mask × sample weight) and per-component shifts
``c_k`` (the previous means), the statistics are

    s0_k = Σ_n ω_n r_nk,   s1_k = Σ_n ω_n r_nk (x_n − c_k),   s2_k = Σ_n ω_n r_nk (x_n − c_k)(x_n − c_k)ᵀ,

plus ``Σ_n ω_n log p(x_n)`` and ``Σ_n ω_n``. They add over chunks of points, over devices and over
repeated points, which is why chunking, masks, sample weights and all-reduce share one mechanism.
Shifting by the previous means keeps the covariance ``s2/s0 − δδᵀ`` (``δ = s1/s0``) free of the
cancellation that raw second moments suffer in float32.

Two E-step kernels compute the same statistics; per chunk of ``n`` points of ``g`` batch elements (chunks take
whole batch elements when those are small, see :func:`_plan`) each is one GEMM giving the joint log-densities
``log w_k + log N(x_n | m_k, Σ_k)`` of all components (laid out ``[g, K, n]``: components × points), the
normalisation over components, and the statistics by GEMMs (``Bf = prod(*B)`` below):

- *whitened* (``D > SMALL_D``): ``y_nk = P_kᵀ(x_n − m_k)`` (``P_k = L_k⁻ᵀ``) for all K components by ONE wide GEMM
  ``[X − c, 1] W`` with ``W = [P_1 … P_K; b_1 … b_K]`` and ``b_k = −P_kᵀ(m_k − c)`` (``c`` a centre of the points,
  so that the GEMM works on centred values; the bias is its last input row, so there is neither a ``[K, N, D]``
  copy of the centred data nor a bias pass), ``log N = −½(‖y‖² + log|Σ| + D log 2π)``. The statistics are two
  more GEMMs: ``Σ_n r_nk [x_n − c, 1]`` (``rᵀ[X − c, 1]``, K rows: it gives ``s0_k`` and
  ``s1_k = Σ r (x − c) − s0_k (m_k − c)``) and the whitened second moments ``G_k = Σ_n r_nk y_nk y_nkᵀ`` (one GEMM
  batched over the components), mapped back once per step by ``s2_k = L_k G_k L_kᵀ``. Cost ``≈ 4·K·N·D²`` flops
  per step, in GEMMs whose output widths are multiples of ``D`` (a ``D+1``-wide Gram runs at 60% of the
  ``D``-wide one on AVX-512).
- *quadratic features* (``D ≤ SMALL_D``): with ``φ(x) = [x̃_i x̃_j (i ≤ j), x̃, 1]`` (``x̃ = x − centre``;
  ``F = D(D+1)/2 + D + 1`` features, 10 for colours, the symmetric products once) the log-densities of all
  components are one GEMM ``Wᵀφ(X)`` with natural parameters ``W`` (``−½Λ_ii`` and ``−Λ_ij`` for ``i < j``,
  ``Λm̃``, constants) and the statistics are one GEMM ``rφ(X)ᵀ``. Both GEMMs, and the normalisation between them,
  run in float64: the expanded quadratic form cancels (its terms are ``‖m̃‖²_Λ``, 10⁵ for a colour cluster of
  σ = 10⁻³ half the colour cube away from the centre: in float32 that is an error of 10⁻² in every log-density
  and relative error 10⁻² in the covariances), and the float64 GEMMs at ``D ≤ 6`` still beat ``D×D`` GEMMs with
  tiny ``D``. ``φ`` is stored feature-major (``[*B, F, N]``: each feature a contiguous row), which makes it
  cheap to build and the log-density GEMM a plain ``[K, F]·[F, n]`` product.

The points' side of each kernel's first GEMM, ``[X − c, 1]`` or ``φ(X)`` about the weighted mean of the points,
does not change during a fit: :func:`point_features` builds it once per fit (up to ``FEATURE_CACHE_BYTES``).

The normalisation of a chunk is ``top = max_k``, ``e = exp(logp − top)``, ``total = Σ_k e``, ``ω r = e·ω/total``
and ``log p(x) = top + log total``; ``top`` and ``total`` of all points are kept (up to ``LOG_LIK_POINTS``), so
that the log-likelihood ``Σ ω log p`` is three operations per step instead of four per chunk. Every pass runs in
the dtype of the log-densities (float64 for the quadratic kernel: one pass over float64 is cheaper than a
conversion to float32 and back, and mixed-dtype element-wise operations run several times slower than either).

In place, when autograd does not record the E-step (``grad="none"`` fits, every step but the last of the
``"one_step"`` and ``"implicit"`` modes, ``torch.no_grad()``) and the caller passes a :class:`Workspace`: every
per-chunk temporary is a workspace buffer, allocated in the first chunk of a fit and reused by every chunk of
every step (and so are the views of those buffers that a chunk needs). The exponentials overwrite the
log-densities and the responsibilities the exponentials; the whitened kernel scales ``y`` in place by
``√(ω r)``, so that ``G_k`` is the Gram matrix of a single buffer. When autograd records, the same formulas run
out of place (with ``G_k = Σ (ω r y) yᵀ``, since ``√r`` has an infinite derivative at ``r = 0``).

Fusion, measured (torch 2.14, one AVX-512 core, 32 colour fits of 2048 points, K = 10, issue 18): the in-place
chunk loop of the quadratic kernel takes 2.3-2.6 ms per E-step (3.1-3.5 ms with the step's natural parameters and
statistics), about 60% of a fit. ``torch.compile`` (inductor's C++ backend) does not beat it, so no path here uses
it. Compiled out of place, the chain keeps both GEMMs as library calls and emits one loop nest per stage (maximum,
shifted exponential, sum, the statistics' scaling): 3.5 ms per E-step in the same chunks. Written in place it ran
5.4 ms. Unrolled over the components (every stage on ``[g, n]``, the statistics as K·F reductions over the points)
it was still four loop nests, 5-9 ms, and took 50-80 s to compile. Compiling costs about 45 s on a cold cache and
3-7 s warm, per process and, with static shapes, per chunk size (``dynamic=True``: no recompilation for new ``g``
or ``n``, 1.3 s for a new ``K``). In plain torch, ``torch.softmax`` over the components (one operator for the
maximum, exponential, sum and division) ran 1.5× slower than the passes it would replace and has no clamp, and
folding the shift into a second GEMM (the maximum as an extra feature row with weight −1, instead of the
subtraction) made the E-step 20% slower.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from .gmm import GMM, LOG_2PI

__all__ = ["SuffStats", "QuadFeatures", "WhitenedFeatures", "Workspace", "point_features", "quad_point_features",
           "quad_feature_count", "whitened_point_features", "quad_stats_about", "accumulate_stats", "e_step",
           "e_step_unchecked", "stats_from_resp", "responsibility_stats", "chunk_bounds"]

SMALL_D = 6  # largest dimension that uses the quadratic-feature kernel
FEATURE_CACHE_BYTES = 256 << 20  # largest per-fit features (φ(X), [X − c, 1]); beyond, built per chunk
DENORMAL_MARGIN = 30.0  # responsibilities below tiny·e^30 (relative to the largest) are exactly zero

# Elements of one [*B, K, n, D] temporary per chunk (4 MiB in float32) for the helpers that chunk with
# chunk_bounds (initialisations, maps): small enough to stay in cache and to be recycled by the allocator.
CHUNK_ELEMENTS = 1 << 20
# The quadratic kernel's float64 log-densities [Bf, K, n] per chunk (1 MiB): the element-wise passes over them
# (maximum, shift, exp, sum, scale) ran 1.5-2× faster on chunks that stay in a core's L2 cache than on 4 MiB ones
# (32 colour fits, K=10, N=2048), and the dozen operator calls a chunk costs are still negligible.
QUAD_CHUNK_ELEMENTS = 1 << 17
# The whitened kernel's y [n, *B, K, D] per chunk: the GEMMs that write and read it run fastest when it stays
# in a core's L2 cache (1 MiB in float32; 2¹⁹ or 2²⁰ elements were 10-15% slower at D=48, K=8).
WHITENED_CHUNK_ELEMENTS = 1 << 18
# Points (over all batch elements) up to which a step keeps the maximum and the sum over components of every
# point (two float64 numbers each, 16 MiB), to take the log-likelihood in one pass per step; beyond, per chunk.
LOG_LIK_POINTS = 1 << 20


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
    views; :meth:`views` memoises the further views a kernel derives from its buffers). Contents on return are
    whatever the previous user left. The kernels use a workspace only while autograd does not record them (see
    the module docstring); results returned to callers never view its buffers.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}
        self._views: dict[tuple, Tensor] = {}
        self._derived: dict[tuple, tuple[Tensor, ...]] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (name, tuple(shape), dtype, device)
        view = self._views.get(key)
        if view is None:
            numel = math.prod(shape)
            buf = self._buffers.get(name)
            if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
                buf = self._buffers[name] = torch.empty(numel, dtype=dtype, device=device)
                self._views = {k: v for k, v in self._views.items() if k[0] != name}
                self._derived.clear()
            view = self._views[key] = buf[:numel].view(shape)
        return view

    def views(self, key: tuple, make: Callable[[], tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
        """``make()``, views of this workspace's buffers (taken with :meth:`take`), memoised under ``key`` until a
        buffer is reallocated. ``key`` must determine everything ``make`` builds (names, shapes, dtype, device)."""
        got = self._derived.get(key)
        if got is None:
            got = make()
            self._derived[key] = got
        return got


def _scratch(ws: Workspace | None, name: str, shape: tuple[int, ...], like: Tensor,
             dtype: torch.dtype | None = None) -> Tensor | None:
    """The ``out=`` argument of a kernel step: workspace buffer ``name``, or ``None`` (allocate) without one."""
    return None if ws is None else ws.take(name, shape, like.dtype if dtype is None else dtype, like.device)


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


# ----------------------------------------------------------------------------- normalisation over components
def _cut(dtype: torch.dtype) -> float:
    """``log(tiny · e^DENORMAL_MARGIN)`` of ``dtype``: shifted log-densities at or below it give exactly zero."""
    return math.log(torch.finfo(dtype).tiny) + DENORMAL_MARGIN


def _shifted_exp(logp: Tensor, top: Tensor, cut: float, zero: bool, out: Tensor | None) -> Tensor:
    """``e = exp(logp − top)`` for ``logp [Bf, K, n]`` and its maximum over components ``top [Bf, 1, n]``, with the
    shifted log-densities clamped at ``cut − 1`` (``cut`` of the points' dtype, :func:`_cut`) and, if ``zero``, the
    terms at or below ``exp(cut)`` then set to exactly zero.

    Such terms are below the dtype's resolution of the sums they enter (1e-25 against float32's 1e-7), but the
    ``exp`` must not see smaller arguments (nor ``−∞``): those with subnormal or zero results take a slow path of
    the vectorised ``exp``, ten to a hundred times slower. Their products in the statistics and in the backward
    pass can be subnormal numbers, on which CPU arithmetic is several times slower too (a texture synthesis ran
    1.6× slower once a few components had such responsibilities): the kernels whose statistics are in the
    points' dtype ask for exact zeros. ``top`` must be detached (the shift is exact for the value and its
    gradient). With ``out`` (a workspace buffer, possibly ``logp`` itself) every pass runs in place in it;
    ``None``: out of place.
    """
    if out is None:
        e = (logp - top).clamp_min(cut - 1.0).exp()
        return torch.threshold(e, math.exp(cut), 0.0) if zero else e
    e = torch.sub(logp, top, out=out).clamp_min_(cut - 1.0).exp_()
    return torch.threshold_(e, math.exp(cut), 0.0) if zero else e


# ----------------------------------------------------------------------------- the whitened kernel
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


def _first_moment_about(u: Tensor, s0: Tensor, offset: Tensor) -> Tensor:
    """``s1 = Σ r (x − c − offset) = u − s0·offset`` from ``u = Σ r (x − c) [*B, K, D]``, ``s0 [*B, K]``."""
    return u - s0.unsqueeze(-1) * offset


# ----------------------------------------------------------------------------- the quadratic-feature kernel
def quad_feature_count(d: int) -> int:
    """``F = D(D+1)/2 + D + 1``: the quadratic features of points in ``D`` dimensions."""
    return d * (d + 1) // 2 + d + 1


@functools.cache
def _pair_index(d: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Index tensors of the products ``x̃_i x̃_j`` (``i ≤ j``, row-major) among the quadratic features.

    ``(flat [P], coef [P], sym [D²])`` with ``P = D(D+1)/2``: ``flat`` the position ``iD + j`` of each pair in a
    flattened ``D×D`` matrix, ``coef`` its coefficient in ``−½ x̃ᵀΛx̃`` (``−½`` on the diagonal, ``−1`` off it,
    float64) and ``sym`` the pair of each entry ``(i, j)`` of a symmetric matrix. Cached per ``(D, device)``, so
    that no step copies indices to the device."""
    pairs = [(i, j) for i in range(d) for j in range(i, d)]
    position = {pair: p for p, pair in enumerate(pairs)}
    flat = torch.tensor([i * d + j for i, j in pairs], device=device)
    coef = torch.tensor([-0.5 if i == j else -1.0 for i, j in pairs], dtype=torch.float64, device=device)
    sym = torch.tensor([position[min(i, j), max(i, j)] for i in range(d) for j in range(d)], device=device)
    return flat, coef, sym


def quad_point_features(x: Tensor, centre: Tensor, out: Tensor | None = None) -> Tensor:
    """``φ(x) = [x̃_i x̃_j (i ≤ j, row-major), x̃, 1]`` in float64, feature-major: ``[*B, F, n]`` for ``x [*B, n, D]``
    and ``centre [*B, D]`` (``x̃ = x − centre``, ``F = quad_feature_count(D)``).

    Unless autograd records, φ is written in place into ``out`` (allocated when ``None``), without temporaries.
    """
    d, n = x.shape[-1], x.shape[-2]
    p = d * (d + 1) // 2
    if out is None:
        if _records_tensors(x, centre):
            xt = (x.double() - centre.double().unsqueeze(-2)).mT
            products = [xt[..., i:i + 1, :] * xt[..., i:, :] for i in range(d)]
            return torch.cat([*products, xt, torch.ones_like(xt[..., :1, :])], dim=-2)
        out = x.new_empty(*x.shape[:-2], quad_feature_count(d), n, dtype=torch.float64)
    xt = torch.sub(x.mT, centre.double().unsqueeze(-1), out=out[..., p:p + d, :])
    row = 0
    for i in range(d):
        torch.mul(xt[..., i:i + 1, :], xt[..., i:, :], out=out[..., row:row + d - i, :])
        row += d - i
    out[..., -1, :].fill_(1.0)
    return out


def _natural_params(gmm: GMM, centre: Tensor) -> Tensor:
    """``Wᵀ [*B, K, F]`` (float64) with ``(Wᵀφ(x))_k = log w_k + log N(x | m_k, Σ_k)``.

    ``log N = −½ x̃ᵀΛx̃ + x̃ᵀΛm̃ − ½ m̃ᵀΛm̃ − ½ log|Σ| − ½ D log 2π`` with ``Λ = Σ⁻¹ = PPᵀ``, ``m̃ = m − centre``
    (``centre [*B, D]`` float64) and the quadratic term over the pairs ``i ≤ j`` (:func:`_pair_index`).
    """
    d = gmm.n_features
    flat, coef, _ = _pair_index(d, gmm.device)
    prec_chol = gmm.precision_cholesky.double()
    lam = prec_chol @ prec_chol.mT
    mt = gmm.means.double() - centre.unsqueeze(-2)
    lin = (lam @ mt.unsqueeze(-1)).squeeze(-1)
    const = (-0.5 * (mt * lin).sum(-1) - 0.5 * gmm.log_det_covariances.double() + gmm.weights.double().log()
             - 0.5 * d * LOG_2PI)
    quad = torch.index_select(lam.flatten(-2), -1, flat) * coef
    return torch.cat([quad, lin, const.unsqueeze(-1)], dim=-1)


def quad_stats_about(s: Tensor, d: int, shift: Tensor, centre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Statistics about ``shift [*B,K,D]`` from ``s = Σ r φ(x) [*B, K, F]`` (features about ``centre``).

    With ``u = Σ r x̃``, ``V = Σ r x̃x̃ᵀ`` (from its pairs ``i ≤ j``) and ``c̃ = shift − centre``:
    ``s1 = u − s0 c̃`` and ``s2 = V − u c̃ᵀ − c̃ uᵀ + s0 c̃ c̃ᵀ`` (float64, so the subtraction is exact enough).
    """
    p = d * (d + 1) // 2
    v = torch.index_select(s[..., :p], -1, _pair_index(d, s.device)[2]).unflatten(-1, (d, d))
    u, s0 = s[..., p:p + d], s[..., -1]
    c = shift.double() - centre.double().unsqueeze(-2)
    uc = u.unsqueeze(-1) * c.unsqueeze(-2)
    s2 = v - uc - uc.mT + s0[..., None, None] * (c.unsqueeze(-1) * c.unsqueeze(-2))
    return s0, _first_moment_about(u, s0, c), s2


def _mixture_centre(gmm: GMM) -> Tensor:
    """Expansion point of the features when none is cached: the mixture mean ``Σ w_k m_k [*B, D]``
    (detached: the statistics do not depend on it mathematically, so its gradient is exactly zero)."""
    return (gmm.weights.unsqueeze(-1) * gmm.means).sum(-2).detach()


@dataclass
class QuadFeatures:
    """Per-fit cache of the quadratic-feature kernel: expansion point ``centre [*B, D]`` and
    ``phi = φ(X) [*B, F, N]`` (float64, :func:`quad_point_features`). ``X`` does not change during a fit, so
    ``φ`` is built once."""

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
    width, itemsize = (quad_feature_count(d), 8) if quad else (d + 1, x.element_size())
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


# ----------------------------------------------------------------------------- the chunked E-step
@dataclass(frozen=True)
class _Plan:
    """How an E-step splits its work into chunks: ``size`` batch elements with all their points per chunk
    (``over_batch``), or ``size`` points of all batch elements per chunk; ``count`` chunks; whether the kernels
    run in place (in a workspace)."""

    over_batch: bool
    size: int
    count: int
    in_place: bool

    def split(self, t: Tensor, batch_dim: int, point_dim: int) -> tuple[Tensor, ...]:
        """The chunks' views of ``t``, whose batch (``Bf``) and point dimensions are ``batch_dim``, ``point_dim``."""
        return t.split(self.size, batch_dim if self.over_batch else point_dim)

    def per_chunk(self, t: Tensor, rows: int = 1) -> tuple[Tensor, ...]:
        """The chunks' views of ``t [Bf·rows, …]``, per batch element (all of it when the chunks split points)."""
        return t.split(self.size * rows, 0) if self.over_batch else (t,) * self.count


def _plan(bf: int, n_points: int, per_point: int, budget: int, in_place: bool, chunk_size: int | None) -> _Plan:
    """Chunks whose temporaries hold about ``budget`` elements, ``per_point`` per point and batch element.

    ``chunk_size`` (points per chunk) overrides the budget. Otherwise, when the kernels run in place and half the
    budget holds a batch element's temporaries, chunks take whole batch elements: their GEMMs then keep all ``N``
    points (32 fits of 2048 colours: 25% faster than chunks of a sixth of the points) while the element-wise passes
    still run in a core's L2 cache. Sizes are balanced, so that no small last chunk pays a chunk's fixed costs
    for little work.
    """
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return _Plan(False, chunk_size, -(-n_points // chunk_size), in_place)
    count = -(-bf * n_points * per_point // budget)
    if in_place and bf > 1 and 2 * n_points * per_point <= budget:
        size = -(-bf // count)
        return _Plan(True, size, -(-bf // size), in_place)
    size = -(-n_points // count)
    return _Plan(False, size, -(-n_points // size), in_place)


def _chunk_points(x: Tensor, plan: _Plan) -> tuple[Tensor, ...]:
    """The chunks of the points ``x [*B, N, D]``: ``[g, N, D]`` views of the flattened batch, or ``[*B, n, D]`` views
    (flattened per chunk by the kernel, so that points whose batch dimensions do not merge into a view are copied
    chunk by chunk, never as a whole)."""
    return plan.split(x.reshape(-1, *x.shape[-2:]), 0, 1) if plan.over_batch else x.split(plan.size, -2)


def _whitened_views(ws: Workspace, n: int, g: int, k: int, d: int, dtype: torch.dtype,
                    device: torch.device) -> tuple[Tensor, ...]:
    """The views of the whitened kernel's buffers for a chunk of ``g`` batch elements and ``n`` points: ``y [n, g,
    K·D]`` as the GEMM's output ``[g, n, K·D]`` and as ``[n, g, K, D]``; ``logp [g, K, n]`` as the norms' output
    ``[n, g, K]``, as itself and as the row scale ``[n, g, K, 1]``; ``y`` as the Gram's operands ``[g·K, D, n]``,
    ``[g·K, n, D]``."""
    y = ws.take("y", (n, g, k * d), dtype, device)
    logp = ws.take("logp", (g, k, n), dtype, device)
    a = y.view(n, g * k, d)
    return (y.transpose(0, 1), y.view(n, g, k, d), logp.permute(2, 0, 1), logp, logp.permute(2, 0, 1).unsqueeze(-1),
            a.permute(1, 2, 0), a.transpose(0, 1))


class _WhitenedKernel:
    """The whitened kernel of one E-step (module docstring) of ``gmm`` on ``x [*B, N, D]``, by chunks of ``plan``.

    Per-step constants: ``centre [*B, D]`` (subtracted from the points so that the GEMM works on centred values:
    the cached features' centre, else the detached mixture mean), ``w_aug [Bf, D+1, K·D]`` (``P_1 … P_K`` side by
    side over the row of biases ``−(m_k − centre)ᵀ P_k``) and ``const [Bf, K, 1]`` (``log w_k − ½ log|Σ_k| −
    ½ D log 2π``). Statistics ``u [Bf, K, D+1]`` (``Σ ωr·[x − centre, 1]``) and ``g [Bf·K, D, D]`` (``Σ ωr·y yᵀ``).
    The current chunk's ``xh``, ``y`` (and, in place, the Gram's operands and the row scale) are kept between
    :meth:`log_densities` and :meth:`accumulate`; ``weighted``: point weights scale the responsibilities (zero
    weights give exact zeros).
    """

    _xh: Tensor
    _y: Tensor
    _gram: tuple[Tensor, ...]
    _scale: Tensor

    @staticmethod
    def per_point(k: int, d: int) -> int:
        return k * d

    def __init__(self, gmm: GMM, x: Tensor, features: WhitenedFeatures | None, plan: _Plan, weighted: bool) -> None:
        k, d = gmm.n_components, gmm.n_features
        self.weighted = weighted
        self.gmm, self.x, self.k, self.d, self.plan = gmm, x, k, d, plan
        self.bf = math.prod(gmm.batch_shape)
        self.dtype = x.dtype  # of the log-densities
        # responsibilities below the cut are zero (see _shifted_exp) where subnormal products could arise: in
        # float64, and in the backward pass; the in-place float32 statistics see clamped terms ≥ 4.6e-26 times y
        self.exact_zeros = x.dtype == torch.float64 or not plan.in_place
        self.centre = _mixture_centre(gmm) if features is None else features.centre
        prec = gmm.precision_cholesky
        p_cat = prec.movedim(-3, -2).reshape(-1, d, k * d)
        bias = -((gmm.means - self.centre.unsqueeze(-2)).unsqueeze(-2) @ prec).reshape(-1, 1, k * d)
        self.w_aug = plan.per_chunk(torch.cat([p_cat, bias], dim=-2))
        self.const = plan.per_chunk(
            (gmm.weights.log() - 0.5 * (gmm.log_det_covariances + d * LOG_2PI)).reshape(-1, k, 1))
        self.cached = features is not None
        self.points = (_chunk_points(x, plan) if features is None
                       else plan.split(features.xh.reshape(self.bf, -1, d + 1), 0, 1))
        self.u = x.new_zeros(self.bf, k, d + 1)
        self.g = x.new_zeros(self.bf * k, d, d)
        self.u_parts, self.g_parts = plan.per_chunk(self.u), plan.per_chunk(self.g, k)

    def log_densities(self, i: int, ws: Workspace | None) -> Tensor:
        """``logp [g, K, n]`` of chunk ``i``: ``y_nk = (x_n − m_k)ᵀ P_k`` from ONE GEMM ``xh · w_aug`` with ``xh =
        [x − centre, 1]`` (cached, or built here) and ``logp = const − ½‖y‖²``. Points are the outer dimension of
        ``y``, so that the components of all batch elements form one batch of the statistics GEMM, and the inner
        one of ``logp``, so that sums and maxima over components run along contiguous rows."""
        k, d, x = self.k, self.d, self.x
        xh = self.points[i]
        if not self.cached:  # the chunk's points
            xh = xh.reshape(-1, xh.shape[-2], d)
            centre = self.centre.reshape(self.bf, d)
            centre = centre.split(self.plan.size)[i] if self.plan.over_batch else centre
            xh = whitened_point_features(xh, centre, out=_scratch(ws, "xh", (*xh.shape[:-1], d + 1), x))
        g, n = xh.shape[0], xh.shape[1]
        self._xh = xh
        w_aug, const = self.w_aug[i], self.const[i]
        if ws is None:
            y = torch.bmm(xh, w_aug).transpose(0, 1).unflatten(-1, (k, d))
            norm = torch.linalg.vector_norm(y, dim=-1).permute(1, 2, 0)
            self._y = y
            return torch.addcmul(const, norm, norm, value=-0.5)
        y_gemm, y, norm_out, logp, scale, *gram = ws.views(
            ("whitened", n, g, k, d, x.dtype, x.device), lambda: _whitened_views(ws, n, g, k, d, x.dtype, x.device))
        torch.bmm(xh, w_aug, out=y_gemm)
        torch.linalg.vector_norm(y, dim=-1, out=norm_out)
        self._y, self._gram, self._scale = y, tuple(gram), scale
        return torch.addcmul(const, logp, logp, value=-0.5, out=logp)

    def accumulate(self, i: int, rw: Tensor, ws: Workspace | None) -> None:
        """``u += Σ_n ωr·xh`` and ``g += Σ_n ωr·y yᵀ`` over chunk ``i``, for the weighted responsibilities
        ``rw [g, K, n]`` (overwritten by ``√(ωr)`` with a workspace, and ``y`` by ``√(ωr)·y``).

        With exact zeros among the responsibilities (:attr:`exact_zeros`, or zero point weights) the square root is
        taken as ``rsqrt(1 / ωr)``: zeros send ``sqrt`` down a slow path of the vectorised math library, three
        times slower than both of these."""
        if ws is None:  # the chunks split the points: one accumulator each
            self.u = torch.baddbmm(self.u, rw, self._xh)
            n, g, k, d = self._y.shape
            b = self._y.reshape(n, g * k, d)
            a = (self._y * rw.permute(2, 0, 1).unsqueeze(-1)).reshape(n, g * k, d)
            self.g = torch.baddbmm(self.g, a.permute(1, 2, 0), b.transpose(0, 1))
            return
        u, gram = self.u_parts[i], self.g_parts[i]
        torch.baddbmm(u, rw, self._xh, out=u)
        if self.exact_zeros or self.weighted:
            rw.reciprocal_().rsqrt_()
        else:
            rw.sqrt_()
        self._y.mul_(self._scale)
        torch.baddbmm(gram, *self._gram, out=gram)

    def stats(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(s0, s1, s2)`` about the means: ``s1 = Σ ωr (x − centre) − s0 (m − centre)``, ``s2_k = L_k G_k L_kᵀ``."""
        gmm, d = self.gmm, self.d
        u = self.u.reshape(*gmm.batch_shape, self.k, d + 1)
        s0 = u[..., d]
        s1 = _first_moment_about(u[..., :d], s0, gmm.means - self.centre.unsqueeze(-2))
        chol = gmm.cholesky
        return s0, s1, chol @ self.g.reshape(*gmm.batch_shape, self.k, d, d) @ chol.mT


class _QuadKernel:
    """The quadratic-feature kernel of one E-step (module docstring) of ``gmm`` on ``x [*B, N, D]``, by chunks of
    ``plan``: natural parameters ``w_t = Wᵀ [Bf, K, F]`` about ``centre [*B, D]`` (float64; the cached features'
    centre, else the detached mixture mean) and the statistics ``s = Σ ωr φᵀ [Bf, K, F]`` (float64); the current
    chunk's φ is kept between :meth:`log_densities` and :meth:`accumulate`."""

    _phi: Tensor

    @staticmethod
    def per_point(k: int, d: int) -> int:
        return k

    def __init__(self, gmm: GMM, x: Tensor, features: QuadFeatures | None, plan: _Plan) -> None:
        self.gmm, self.x, self.d, self.plan = gmm, x, gmm.n_features, plan
        self.bf = math.prod(gmm.batch_shape)
        self.f = quad_feature_count(self.d)
        self.dtype = torch.float64  # of the log-densities
        # float64 statistics of float32 points: the clamped terms (≥ 4.6e-26) times φ are far from subnormal
        self.exact_zeros = x.dtype == torch.float64
        self.centre = (_mixture_centre(gmm) if features is None else features.centre).double()
        self.w_t = plan.per_chunk(_natural_params(gmm, self.centre).reshape(self.bf, gmm.n_components, self.f))
        self.cached = features is not None
        self.points = (_chunk_points(x, plan) if features is None
                       else plan.split(features.phi.reshape(self.bf, self.f, -1), 0, 2))
        self.s = x.new_zeros(self.bf, gmm.n_components, self.f, dtype=torch.float64)
        self.s_parts = plan.per_chunk(self.s)

    def log_densities(self, i: int, ws: Workspace | None) -> Tensor:
        """``logp = Wᵀφ [g, K, n]`` (float64) of chunk ``i``, φ cached or built here."""
        phi = self.points[i]
        if not self.cached:  # the chunk's points
            phi = phi.reshape(-1, phi.shape[-2], self.d)
            centre = self.centre.reshape(self.bf, self.d)
            centre = centre.split(self.plan.size)[i] if self.plan.over_batch else centre
            out = _scratch(ws, "phi", (phi.shape[0], self.f, phi.shape[1]), phi, torch.float64)
            phi = quad_point_features(phi, centre, out=out)
        self._phi = phi
        w_t = self.w_t[i]
        return torch.bmm(w_t, phi, out=_scratch(ws, "logp64", (phi.shape[0], w_t.shape[1], phi.shape[2]), phi))

    def accumulate(self, i: int, rw: Tensor, ws: Workspace | None) -> None:
        """``s += rw φᵀ`` over chunk ``i``, for the weighted responsibilities ``rw [g, K, n]``."""
        if ws is None:  # the chunks split the points: one accumulator
            self.s = torch.baddbmm(self.s, rw, self._phi.mT)
        else:
            s = self.s_parts[i]
            torch.baddbmm(s, rw, self._phi.mT, out=s)

    def stats(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(s0, s1, s2)`` about the means, in the points' dtype (:func:`quad_stats_about`)."""
        gmm, dtype = self.gmm, self.x.dtype
        s0, s1, s2 = quad_stats_about(self.s.reshape(*gmm.batch_shape, gmm.n_components, self.f), self.d, gmm.means,
                                      self.centre)
        return s0.to(dtype), s1.to(dtype), s2.to(dtype)


def _kernel(gmm: GMM, x: Tensor, features: QuadFeatures | WhitenedFeatures | None, in_place: bool,
            chunk_size: int | None, weighted: bool = False) -> _QuadKernel | _WhitenedKernel:
    """The E-step kernel for ``gmm``'s dimension, with its chunks (``weighted``: point weights will scale the
    responsibilities)."""
    kind: type[_QuadKernel] | type[_WhitenedKernel] = _QuadKernel if gmm.n_features <= SMALL_D else _WhitenedKernel
    budget = QUAD_CHUNK_ELEMENTS if kind is _QuadKernel else WHITENED_CHUNK_ELEMENTS
    plan = _plan(math.prod(gmm.batch_shape), x.shape[-2], kind.per_point(gmm.n_components, gmm.n_features), budget,
                 in_place, chunk_size)
    if kind is _QuadKernel:
        return _QuadKernel(gmm, x, cast(QuadFeatures | None, features), plan)
    return _WhitenedKernel(gmm, x, cast(WhitenedFeatures | None, features), plan, weighted)


def _cached(features: QuadFeatures | WhitenedFeatures | None) -> Tensor | None:
    """The cached points' side of the kernels' first GEMM (φ or ``[X − c, 1]``), or ``None``."""
    if features is None:
        return None
    return features.phi if isinstance(features, QuadFeatures) else features.xh


def _log_prob(top: Tensor, total: Tensor, w: Tensor | None) -> Tensor:
    """``ω log p(x) = ω (top + log total)`` in place in ``total`` (all ``[g, 1, n]``; ``w``: ``ω``, or ``None``)."""
    log_norm = total.log_().add_(top)
    return log_norm if w is None else log_norm.mul_(w)


def accumulate_stats(gmm: GMM, x: Tensor, weight: Tensor | None = None, chunk_size: int | None = None,
                     features: QuadFeatures | WhitenedFeatures | None = None,
                     workspace: Workspace | None = None) -> SuffStats:
    """E-step fused with the accumulation of sufficient statistics, chunked over points or batch elements.

    Args:
        gmm: current parameters, batch ``*B``.
        x: ``[*B, N, D]`` points (entries with zero weight must be finite; callers zero them).
        weight: ``[*B, N]`` non-negative point weights ``ω_n`` or ``None`` for all ones.
        chunk_size: points per chunk (default: chunks of about 2¹⁷ float64 log-densities for the quadratic kernel,
            2¹⁸ elements of the whitened ``y``, see :func:`_plan`).
        features: the fit's cached :func:`point_features` of ``x`` (built per chunk if None).
        workspace: scratch buffers for the in-place kernels, used when autograd does not record this call
            (module docstring); ``None`` allocates per chunk.

    Never stores responsibilities: memory is ``O(B·K·chunk·D + B·K·D²)`` beyond the inputs (and 16 bytes per point
    up to ``LOG_LIK_POINTS`` points). Sums over
    chunks accumulate in place; the kernels' GEMMs (see the module docstring) yield ``s0``, ``s1`` about the
    previous means and, for the whitened kernel, ``s2_k = L_k G_k L_kᵀ``.
    """
    bshape, n_points = gmm.batch_shape, x.shape[-2]
    ws = None if workspace is None or _records(gmm, x, weight, _cached(features)) else workspace
    kernel = _kernel(gmm, x, features, ws is not None, chunk_size, weight is not None)
    plan, bf, dtype, cut = kernel.plan, kernel.bf, kernel.dtype, _cut(x.dtype)
    w_all = None if weight is None else weight.reshape(bf, 1, n_points)
    w_chunks = None if w_all is None else plan.split(w_all, 0, 2)
    if ws is None:
        log_lik = x.new_zeros(bf, dtype=dtype)
        for i in range(plan.count):
            logp = kernel.log_densities(i, None)
            top = logp.detach().amax(1, keepdim=True)
            e = _shifted_exp(logp, top, cut, kernel.exact_zeros, None)
            total = e.sum(1, keepdim=True)
            log_norm = total.log() + top
            if w_chunks is None:
                kernel.accumulate(i, e / total, None)
            else:
                kernel.accumulate(i, e * (w_chunks[i] / total), None)
                log_norm = log_norm * w_chunks[i]
            log_lik = log_lik + log_norm.sum((1, 2))
    else:
        keep = bf * n_points <= LOG_LIK_POINTS  # keep top and total of all points: one log-likelihood pass per step
        if keep:
            top_all = ws.take("top", (bf, 1, n_points), dtype, x.device)
            total_all = ws.take("total", (bf, 1, n_points), dtype, x.device)
            tops, totals = plan.split(top_all, 0, 2), plan.split(total_all, 0, 2)
        else:
            log_lik = x.new_zeros(bf, dtype=dtype)
            lik_parts = plan.per_chunk(log_lik)
        for i in range(plan.count):
            logp = kernel.log_densities(i, ws)
            shape = (logp.shape[0], 1, logp.shape[2])
            top = torch.amax(logp, 1, keepdim=True, out=tops[i] if keep else ws.take("top", shape, dtype, x.device))
            e = _shifted_exp(logp, top, cut, kernel.exact_zeros, logp)
            total = torch.sum(e, 1, keepdim=True, out=totals[i] if keep else ws.take("total", shape, dtype, x.device))
            scale = ws.take("scale", shape, dtype, x.device)  # ω / total: one division per point, not per component
            if w_chunks is None:
                torch.reciprocal(total, out=scale)
            else:
                torch.div(w_chunks[i], total, out=scale)
            kernel.accumulate(i, e.mul_(scale), ws)
            if not keep:
                part = torch.sum(_log_prob(top, total, None if w_chunks is None else w_chunks[i]), (1, 2),
                                 out=ws.take("log_lik", (shape[0],), dtype, x.device))
                lik_parts[i].add_(part)
        if keep:
            log_lik = _log_prob(top_all, total_all, w_all).sum((1, 2))
    s0, s1, s2 = kernel.stats()
    total_weight = (torch.full(bshape, n_points, dtype=x.dtype, device=x.device) if weight is None
                    else weight.sum(-1))
    return SuffStats(s0, s1, s2, log_lik.reshape(bshape).to(x.dtype), total_weight, gmm.means)


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
    return e_step_unchecked(gmm, x, chunk_size, features, workspace)


def e_step_unchecked(gmm: GMM, x: Tensor, chunk_size: int | None = None,
                     features: QuadFeatures | WhitenedFeatures | None = None,
                     workspace: Workspace | None = None) -> tuple[Tensor, Tensor]:
    """:func:`e_step` for points and a mixture the caller has checked already (finite ``x [*B, N, D]`` of the
    mixture's shape, and Cholesky factors that did not fail), without reading the device."""
    k, bshape, n_points = gmm.n_components, gmm.batch_shape, x.shape[-2]
    ws = None if _records(gmm, x, _cached(features)) else workspace or Workspace()
    kernel = _kernel(gmm, x, features, ws is not None, chunk_size)
    plan, bf, dtype, cut = kernel.plan, kernel.bf, kernel.dtype, _cut(x.dtype)
    if ws is None:
        resp, norms = [], []
        for i in range(plan.count):
            logp = kernel.log_densities(i, None)
            top = logp.detach().amax(1, keepdim=True)
            log_norm = _shifted_exp(logp, top, cut, kernel.exact_zeros, None).sum(1, keepdim=True).log() + top
            resp.append((logp - log_norm).mT.to(x.dtype))  # [Bf, n, K]
            norms.append(log_norm.squeeze(1).to(x.dtype))  # [Bf, n]
        return torch.cat(resp, dim=1).reshape(*bshape, n_points, k), torch.cat(norms, dim=-1).reshape(*bshape, n_points)
    log_resp = x.new_empty(*x.shape[:-1], k)
    log_prob = x.new_empty(x.shape[:-1])
    resp_chunks = plan.split(log_resp.view(bf, n_points, k), 0, 1)
    prob_chunks = plan.split(log_prob.view(bf, 1, n_points), 0, 2)
    for i in range(plan.count):
        logp = kernel.log_densities(i, ws)
        top = torch.amax(logp, 1, keepdim=True, out=ws.take("top_chunk", prob_chunks[i].shape, dtype, x.device))
        e = _shifted_exp(logp, top, cut, kernel.exact_zeros, ws.take("e", tuple(logp.shape), dtype, x.device))
        log_norm = torch.sum(e, 1, keepdim=True, out=ws.take("total_chunk", tuple(top.shape), dtype, x.device))
        log_norm.log_().add_(top)
        torch.sub(logp.mT, log_norm.mT, out=resp_chunks[i])
        prob_chunks[i].copy_(log_norm)
    return log_resp, log_prob
