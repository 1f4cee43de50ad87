"""Removal of isolated off-texture pixels ("speckles") from a synthesis, calibrated on its exemplar.

The semi-dual finish's colour term (:mod:`imgmw.texture_semidual`) moves single pixels between colour modes
when the synthesis's colour proportions differ from the exemplar's; on flat regions (the stripes' bands, the
bricks' faces) they stay as a grain of single off-colour pixels that no exemplar neighbourhood has. With ``P``
the ``3×3`` neighbourhood of a pixel (27 values), ``R(P)`` its ring (the 8 neighbours, 24 values) and ``E`` the
``3×3`` patches of the exemplar, the pixel's **excess**

    e(P) = min_E ‖P − E‖² − min_E ‖R(P) − R(E)‖²   (>= 0)

is what its own colour adds to the distance of its neighbourhood to the exemplar's. A speckle has a ring that
the exemplar has and a centre that does not fit it: a large excess. It is replaced by the centre of the
exemplar patch whose ring is nearest (Efros & Leung's non-parametric filling of a pixel from its
neighbours). A speckle also spoils its neighbours' rings, so a pass replaces only the pixels whose excess is the
largest in their ``3×3`` neighbourhood, and the next pass sees the repaired rings (three passes).

"Large" is the exemplar's own measure: the threshold ``τ`` is the ``quantile`` (0.99) of the excess of the
patches of one half of the exemplar against the patches of the other half (another sample of the same
texture, not in the bank), so a genuine texture pixel exceeds it with probability about ``1 − quantile``; it is
at least :data:`MIN_EXCESS` (a change of 4/255 per channel: a flat drawn exemplar has ``τ = 0``, and the
exemplar's rare isolated details, such as stars on black under 1 % of the pixels, have an excess of the
order of the noise around them). A stochastic texture (gravel) has a wide excess distribution and a large
``τ`` and keeps its pixels; a drawn one with flat regions (stripes) a small one. (Also requiring the
neighbourhood itself to be far from the exemplar's, ``min_E ‖P − E‖²`` above its own 0.99 quantile, removed
almost nothing on stripes: that quantile is set by the exemplar's band edges.) On the 128×128 syntheses of
``benchmarks/bench_structure.py`` (seed 0) it replaced 1181 pixels on stripes (the grain on the bands gone),
959 on bricks (mostly along the mortar), 126 on veins, 13 on hubble, 12 on gravel, none on wood. The bank is
at most :data:`BANK_PATCHES` random exemplar patches (a quarter of a 256² exemplar's), and a pass after the first
searches only the neighbourhoods of the pixels the previous one replaced: 1–6 s at 256² on one thread.

Only pixels that differ from the mean of their 8 neighbours by more than :data:`CANDIDATE` in some channel are
searched (a speckle does), away from the border unless ``periodic``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .texture_refine import PAIR_BUDGET
from .validation import single_image

__all__ = ["remove_speckles", "speckle_threshold", "DESPECKLE_QUANTILE", "DESPECKLE_PASSES", "CANDIDATE",
           "MIN_EXCESS", "BANK_PATCHES", "CALIBRATION_PATCHES"]

DESPECKLE_QUANTILE = 0.99   # τ: this quantile of the exemplar's own excess
DESPECKLE_PASSES = 3        # passes (each replaces the largest excess of each neighbourhood)
CANDIDATE = 0.05            # pixels further than this from their neighbours' mean (some channel) are searched
MIN_EXCESS = 3 * (4 / 255) ** 2     # τ >= this: a change of 4/255 per channel
BANK_PATCHES = 16384        # at most this many exemplar patches (a 128² exemplar's; a quarter of a 256² one's)
CALIBRATION_PATCHES = 4096  # query patches per half of the exemplar in the calibration

_CENTRE = torch.tensor([4, 13, 22])                                  # the centre of each channel in unfold order
_RING = torch.tensor([i for i in range(27) if i not in (4, 13, 22)])


def _excess(queries: Tensor, bank: Tensor) -> tuple[Tensor, Tensor]:
    """``(e [N], ring-nearest index [N])`` of ``queries [N, 27]`` against ``bank [M, 27]`` (module docstring).

    One product per part: ``‖P − E‖² = ‖R(P) − R(E)‖² + ‖c(P) − c(E)‖²`` (ring and centre), so the ring's
    ``N × M`` distances (up to ``‖R(P)‖²``) are computed once and the full ones add the centre's; both argmins
    on blocks of :data:`PAIR_BUDGET` ``/ 2M`` queries, the distances then recomputed from the chosen pairs.
    """
    ring_i, centre_i = _RING.to(queries.device), _CENTRE.to(queries.device)
    b_ring, b_centre = bank[:, ring_i], bank[:, centre_i]
    ring_sq, centre_sq = b_ring.square().sum(1), b_centre.square().sum(1)
    block = max(1, PAIR_BUDGET // (2 * bank.shape[0]))
    full_index, ring_index = [], []
    for q in queries.split(block):
        ring = torch.addmm(ring_sq, q[:, ring_i], b_ring.T, alpha=-2.0)
        ring_index.append(ring.argmin(1))
        full_index.append(torch.addmm(centre_sq, q[:, centre_i], b_centre.T, alpha=-2.0).add_(ring).argmin(1))
    if not full_index:
        empty = torch.zeros(0, dtype=torch.long, device=queries.device)
        return queries.new_zeros(0), empty
    full_j, ring_j = torch.cat(full_index), torch.cat(ring_index)
    full = (queries - bank[full_j]).square().sum(1)
    ring_d = (queries[:, ring_i] - b_ring[ring_j]).square().sum(1)
    return (full - ring_d).clamp_min(0.0), ring_j


def _patches(image: Tensor) -> Tensor:
    """All ``3×3`` patches of ``image [3, h, w]`` inside it: ``[(h−2)(w−2), 27]`` in ``F.unfold`` order."""
    return F.unfold(image[None], 3)[0].T.contiguous()


def _subset(rows: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    if rows.shape[0] <= n:
        return rows
    pick = torch.randperm(rows.shape[0], generator=generator, device="cpu")[:n].to(rows.device)
    return rows[pick]


def speckle_threshold(exemplar: Tensor, quantile: float = DESPECKLE_QUANTILE, *,
                      generator: torch.Generator | None = None) -> Tensor | None:
    """``τ``: the ``quantile`` of the excess of one half of ``exemplar [3, h, w]`` against the other (at least
    :data:`MIN_EXCESS`).

    The halves split the longer side; :data:`CALIBRATION_PATCHES` random patches of each half are matched
    against at most :data:`BANK_PATCHES` of the other. ``None`` when a half has no ``3×3`` patch.
    """
    u = single_image(exemplar, "exemplar")[0]
    axis = 2 if u.shape[2] >= u.shape[1] else 1
    half = u.shape[axis] // 2
    a, b = u.narrow(axis, 0, half), u.narrow(axis, half, u.shape[axis] - half)
    if min(a.shape[1:]) < 3 or min(b.shape[1:]) < 3:
        return None
    pa, pb = _patches(a), _patches(b)
    e_ab, _ = _excess(_subset(pa, CALIBRATION_PATCHES, generator), _subset(pb, BANK_PATCHES, generator))
    e_ba, _ = _excess(_subset(pb, CALIBRATION_PATCHES, generator), _subset(pa, BANK_PATCHES, generator))
    tau = torch.quantile(torch.cat([e_ab, e_ba]).to(torch.float64), quantile)
    return tau.clamp_min(MIN_EXCESS).to(u.dtype)


def remove_speckles(image: Tensor, exemplar: Tensor, *, quantile: float = DESPECKLE_QUANTILE,
                    passes: int = DESPECKLE_PASSES, periodic: bool = False,
                    generator: torch.Generator | None = None) -> tuple[Tensor, int]:
    """Replace the pixels of ``image [3, H, W]`` whose excess exceeds the exemplar's ``τ`` (module docstring).

    ``periodic``: the image wraps around (a tileable synthesis), so border pixels are searched too.

    Returns:
        ``(image [3, H, W], number of replacements)``; nothing is replaced when the exemplar has a side below
        6 px (no threshold).
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile!r}")
    if not isinstance(passes, int) or isinstance(passes, bool) or passes < 1:
        raise ValueError(f"passes must be an int >= 1, got {passes!r}")
    x = single_image(image, "image")[0]
    u = single_image(exemplar, "exemplar")[0].to(x)
    if x.shape[0] != 3 or u.shape[0] != 3:
        raise ValueError(f"image and exemplar must have 3 channels, got {x.shape[0]} and {u.shape[0]}")
    tau = speckle_threshold(u, quantile, generator=generator)
    if tau is None or min(x.shape[1:]) < 3:
        return x, 0
    bank = _subset(_patches(u), BANK_PATCHES, generator)
    height, width = x.shape[1:]
    replaced = 0
    active = torch.ones(height, width, dtype=torch.bool, device=x.device)
    for _ in range(passes):
        padded = F.pad(x[None], (1, 1, 1, 1), mode="circular" if periodic else "replicate")[0]
        ring_mean = (F.avg_pool2d(padded[None], 3, stride=1)[0] * 9 - x) / 8
        candidate = ((x - ring_mean).abs().amax(0) > CANDIDATE) & active
        if not periodic:
            candidate[[0, -1], :] = False
            candidate[:, [0, -1]] = False
        where = candidate.flatten().nonzero().squeeze(1)
        if where.numel() == 0:
            break
        rows, cols = where // width, where % width
        offsets = torch.arange(3, device=x.device)
        hood = padded[:, (rows[:, None] + offsets)[:, :, None], (cols[:, None] + offsets)[:, None, :]]
        queries = hood.permute(1, 0, 2, 3).reshape(-1, 27)       # [n, 3, 3, 3] -> unfold order (c, dy, dx)
        excess, index = _excess(queries, bank)
        peak = torch.zeros(height * width, dtype=excess.dtype, device=x.device)
        peak[where] = excess
        speckle = (excess > tau) & (excess >= _max_3x3(peak.view(height, width), periodic).flatten()[where])
        if not bool(speckle.any()):
            break
        x = x.clone()
        x.view(3, -1)[:, where[speckle]] = bank[index[speckle]][:, _CENTRE.to(x.device)].T
        replaced += int(speckle.sum())
        # only the neighbourhoods of the replaced pixels changed: the next pass searches those alone
        active = torch.zeros(height * width, dtype=x.dtype, device=x.device)
        active[where[speckle]] = 1.0
        active = _max_3x3(active.view(height, width), periodic) > 0
    return x, replaced


def _max_3x3(values: Tensor, periodic: bool) -> Tensor:
    """``[H, W]`` maximum over every pixel's ``3×3`` neighbourhood (wrapping around when ``periodic``)."""
    v = values[None, None]
    if periodic:
        return F.max_pool2d(F.pad(v, (1, 1, 1, 1), mode="circular"), 3, stride=1)[0, 0]
    return F.max_pool2d(v, 3, stride=1, padding=1)[0, 0]
