"""Grain-preserving post-process of a colour transfer (Pitié, Kokaram & Dahyot, 2007, "regrain").

A colour transfer ``C = t(I)`` moves every pixel of the source ``I`` in colour space; where the map is not
smooth it stretches noise and JPEG blocks or cuts smooth gradients. Regrain looks for the image ``J`` whose
colours follow ``C`` and whose gradients follow the source's:

    min_J  Σ_p ψ_p ‖J_p − C_p‖²  +  Σ_{p~q} φ_pq ‖(J_p − J_q) − (I_p − I_q)‖²,

over 4-neighbour pairs ``p~q``, with weights from the source's gradient magnitude ``g = ‖∇I‖`` (central
differences, replicated borders, summed over the channels):

    ψ = min(1, 256 g / 5)   (flat source areas follow their own gradients, not ``C``),
    φ = 30 · 2^{−ℓ} / (1 + 10 g / smoothness),   φ_pq = (φ_p + φ_q) / 2   (edges of the source may change).

The normal equations are solved by damped Jacobi sweeps,

    J_p ← (1 − ρ) · (ψ_p C_p + Σ_q φ_pq (J_q − I_q + I_p)) / (ψ_p + Σ_q φ_pq) + ρ J_p,   ρ = 1/5,

coarse to fine on a pyramid of half-size levels ``ℓ`` (bilinear resampling; a level is made while both
halved sides exceed 20 px, at most six levels), with 4, 16, 32, 64, 64, 64 sweeps from the finest level to
the coarsest, each level starting from the upsampled solution of the next coarser one and the finest from
``J = I``. These are the constants of the authors' reference code, as in the ``python-color-transfer``
package; ``tests/test_regrain.py`` measures the agreement with that package.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["regrain", "SWEEPS", "RELAXATION"]

SWEEPS = (4, 16, 32, 64, 64, 64)   # Jacobi sweeps per level, finest first
RELAXATION = 0.2                   # ρ: weight of the previous iterate in each sweep
MIN_SIDE = 20                      # a coarser level is made only while both halved sides exceed this
EPS = 1e-6                         # added to the Jacobi denominator


def _neighbours(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Right, down, left and up neighbours of every pixel of ``x [B, C, H, W]`` (replicated borders): views
    into one padded copy."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return p[..., 1:-1, 2:], p[..., 2:, 1:-1], p[..., 1:-1, :-2], p[..., :-2, 1:-1]


def _solve(out: Tensor, source: Tensor, colours: Tensor, sweeps: int, level: int, smoothness: float) -> Tensor:
    """``sweeps`` damped Jacobi sweeps at one level (all ``[B, C, h, w]``)."""
    right, down, left, up = _neighbours(source)
    grad = ((right - left).square() + (down - up).square()).sum(1, keepdim=True).sqrt()   # [B, 1, h, w]
    psi = (256.0 * grad / 5.0).clamp_max(1.0)
    phi = 30.0 * 2.0 ** -level / (1.0 + 10.0 * grad / smoothness)
    phis = [(p + phi) / 2 for p in _neighbours(phi)]
    # Jacobi weights, the previous iterate's damping folded in: J ← a·(fixed + Σ φ_pq J_q) + ρ J
    scale = (1 - RELAXATION) / (psi + sum(phis) + EPS)
    weights = [w * scale for w in phis]
    # the part of the numerator that does not change between sweeps: ψC + Σ φ_pq (I_p − I_q)
    fixed = scale * (psi * colours + sum(w * (source - s) for w, s in zip(phis, (right, down, left, up))))
    for _ in range(sweeps):
        nxt = torch.add(fixed, out, alpha=RELAXATION)
        for w, j in zip(weights, _neighbours(out)):
            nxt.addcmul_(w, j)
        out = nxt
    return out


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _regrain_level(out: Tensor, source: Tensor, colours: Tensor, level: int, smoothness: float) -> Tensor:
    h, w = source.shape[-2:]
    h2, w2 = (h + 1) // 2, (w + 1) // 2
    if level + 1 < len(SWEEPS) and h2 > MIN_SIDE and w2 > MIN_SIDE:
        coarse = _regrain_level(_resize(out, (h2, w2)), _resize(source, (h2, w2)), _resize(colours, (h2, w2)),
                                level + 1, smoothness)
        out = _resize(coarse, (h, w))
    return _solve(out, source, colours, SWEEPS[level], level, smoothness)


def regrain(result: Tensor, source: Tensor, *, smoothness: float = 1.0) -> Tensor:
    """The colours of ``result`` with the grain (gradients) of ``source`` (see the module docstring).

    Args:
        result: ``[B, C, H, W]`` or ``[C, H, W]`` colour-transferred image in [0, 1].
        source: the image it was computed from, same shape, in [0, 1].
        smoothness: larger values let ``J`` follow the source's gradients across stronger edges.

    Returns:
        ``[B, C, H, W]`` or ``[C, H, W]`` (as given) in [0, 1], in the inputs' dtype and device.

    Example:
        >>> source = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
        >>> transferred = (0.5 * source + 0.3).clamp(0, 1)   # a colour transfer that also flattened the grain
        >>> out = regrain(transferred, source)
        >>> out.shape, bool(((out >= 0) & (out <= 1)).all())
        (torch.Size([3, 32, 32]), True)
    """
    if not isinstance(result, Tensor) or not isinstance(source, Tensor):
        raise ValueError("result and source must be image tensors [B, C, H, W] or [C, H, W]")
    if result.shape != source.shape or result.dim() not in (3, 4):
        raise ValueError(f"result {tuple(result.shape)} and source {tuple(source.shape)} must be images of one "
                         "shape [B, C, H, W] or [C, H, W]")
    if not result.is_floating_point() or result.dtype != source.dtype:
        raise ValueError(f"result and source must share one floating dtype, got {result.dtype}, {source.dtype}")
    if not (smoothness > 0) or smoothness == float("inf"):
        raise ValueError(f"smoothness must be a finite number > 0, got {smoothness!r}")
    if not bool(torch.isfinite(result).all()) or not bool(torch.isfinite(source).all()):
        raise ValueError("result and source must be finite")
    batched = result.dim() == 4
    r, s = (result, source) if batched else (result[None], source[None])
    out = _regrain_level(s.clone(), s, r, 0, float(smoothness)).clamp(0, 1)
    return out if batched else out[0]
