"""Input checks shared by the EM entry points. Each failure is a ``ValueError`` naming the argument."""
from __future__ import annotations

import torch
from torch import Tensor

from .linalg import all_finite

__all__ = ["check_points", "point_weights", "valid_counts", "check_valid_counts", "check_reg_covar", "check_choice",
           "single_image", "check_weight"]


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


def check_positive_int(name: str, value: int) -> int:
    """``value`` if it is an integer >= 1 (not a bool), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def check_weight(name: str, value: float) -> float:
    """``float(value)`` if it is a finite number >= 0 (not a bool), e.g. the weight of a loss term, else a
    ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_reg_covar(reg_covar: float) -> float:
    if not (reg_covar >= 0.0) or reg_covar != reg_covar or reg_covar == float("inf"):
        raise ValueError(f"reg_covar must be a finite number >= 0, got {reg_covar!r}")
    return float(reg_covar)


def check_points(x: Tensor) -> Tensor:
    """``x`` must be a floating tensor ``[*B, N, D]`` with ``N, D >= 1``."""
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor of shape [*B, N, D], got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape [*B, N, D] (at least 2 dims), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor (float32/float64), got {x.dtype}; use x.float()")
    if x.dtype in (torch.float16, torch.bfloat16):
        raise TypeError(f"x is {x.dtype}; EM needs float32 or float64 (Cholesky factors in half precision are "
                        "neither available nor accurate): use x.float()")
    if x.shape[-1] < 1 or x.shape[-2] < 1:
        raise ValueError(f"x must have at least one point and one feature, got shape {tuple(x.shape)}")
    return x


def point_weights(x: Tensor, mask: Tensor | None, sample_weight: Tensor | None,
                  n_components: int | None, *, check_finite: bool = True) -> tuple[Tensor, Tensor | None]:
    """Combine ``mask [*B, N]`` and ``sample_weight [*B, N]`` into point weights ``ω [*B, N]`` (or None).

    Returns ``(x_clean, ω)`` where masked-out entries of ``x`` are replaced by zeros so that garbage
    (even NaN) there cannot leak into the fit. Checks finiteness of the valid points, that every batch
    element keeps at least ``n_components`` valid points (skipped for ``None``: a shard of distributed data is
    checked on the reduced counts, :func:`check_valid_counts`) and that weights are finite and non-negative.
    ``check_finite=False`` skips the finiteness check of ``x`` (a host synchronisation), for callers that
    check what they compute from ``x`` further on (e.g. a loss whose linear program rejects non-finite costs).
    """
    bn = x.shape[:-1]
    weight: Tensor | None = None
    if mask is not None:
        if mask.shape != bn:
            raise ValueError(f"mask must have shape [*B, N] = {tuple(bn)}, got {tuple(mask.shape)}")
        mask = mask.to(device=x.device, dtype=torch.bool)
        x = torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
        weight = mask.to(x.dtype)
    if sample_weight is not None:
        if sample_weight.shape != bn:
            raise ValueError(
                f"sample_weight must have shape [*B, N] = {tuple(bn)}, got {tuple(sample_weight.shape)}")
        sw = sample_weight.to(device=x.device, dtype=x.dtype)
        if not bool(torch.isfinite(sw).all()) or bool((sw < 0).any()):
            raise ValueError("sample_weight must be finite and >= 0")
        weight = sw if weight is None else weight * sw
    if check_finite and not all_finite(x):
        raise ValueError("x contains NaN or inf at valid (unmasked) points; clean or mask them")
    if n_components is not None:
        check_valid_counts(valid_counts(x, weight), n_components)
    return x, weight


def valid_counts(x: Tensor, weight: Tensor | None) -> Tensor:
    """Points with positive weight per batch element, ``[*B]`` (int64)."""
    if weight is None:
        return torch.full(x.shape[:-2], x.shape[-2], dtype=torch.int64, device=x.device)
    return (weight > 0).sum(-1)


def check_valid_counts(n_valid: Tensor, n_components: int) -> None:
    """Every batch element needs at least one valid point and at least ``n_components`` of them."""
    if bool((n_valid == 0).any()):
        raise ValueError("mask/sample_weight leave a batch element with no valid point (all-false row)")
    if bool((n_valid < n_components).any()):
        raise ValueError(
            f"n_components={n_components} exceeds the number of valid points ({int(n_valid.min())}) "
            "of some batch element; use fewer components or more points")


def single_image(img: Tensor, name: str) -> Tensor:
    """A finite float image ``[C, H, W]`` or ``[1, C, H, W]`` as ``[1, C, H, W]``; otherwise a ``ValueError``
    naming ``name`` and the shape or dtype (texture refinement and the semi-dual finish take one image)."""
    if not isinstance(img, Tensor) or img.dim() not in (3, 4) or (img.dim() == 4 and img.shape[0] != 1):
        shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
        raise ValueError(f"{name} must be an image tensor [C, H, W] or [1, C, H, W], got {shape}")
    if not img.is_floating_point() or not bool(torch.isfinite(img).all()):
        raise ValueError(f"{name} must be a finite float tensor, got dtype {img.dtype}")
    return img if img.dim() == 4 else img.unsqueeze(0)
