"""Tests of imgmw.patches against naive loops, plus gradients and pyramids."""
from __future__ import annotations

import pytest
import torch

from imgmw.patches import (coverage_scaled, extract_patches, gather_patches, gaussian_pyramid, n_scales_for,
                           patch_coverage, patch_grid, random_patches)


def _naive_patches(img: torch.Tensor, p: int, stride: int, periodic: bool) -> torch.Tensor:
    """Reference: explicit loops over positions, channel-major flattening, modulo indexing when periodic."""
    b, c, h, w = img.shape
    rows = range(0, h, stride) if periodic else range(0, h - p + 1, stride)
    cols = range(0, w, stride) if periodic else range(0, w - p + 1, stride)
    out = []
    for r in rows:
        for q in cols:
            vec = [img[:, ch, (r + i) % h, (q + j) % w] for ch in range(c) for i in range(p) for j in range(p)]
            out.append(torch.stack(vec, dim=1))
    return torch.stack(out, dim=1)


def _img(b=2, c=3, h=5, w=6, dtype=torch.float32, seed=0) -> torch.Tensor:
    return torch.rand(b, c, h, w, dtype=dtype, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("periodic", [False, True])
@pytest.mark.parametrize("p, stride", [(1, 1), (2, 1), (3, 1), (2, 2), (3, 2)])
def test_extract_matches_naive_loop(p, stride, periodic):
    img = _img()
    got = extract_patches(img, p, stride, periodic)
    assert torch.equal(got, _naive_patches(img, p, stride, periodic))


def test_periodic_counts():
    img = _img(h=8, w=6)
    assert extract_patches(img, 4, 1, periodic=True).shape == (2, 8 * 6, 3 * 16)
    assert extract_patches(img, 4, 2, periodic=True).shape == (2, 8 * 6 // 4, 3 * 16)
    assert extract_patches(img, 4).shape == (2, 5 * 3, 48)
    assert patch_grid(8, 6, 4) == (5, 3) and patch_grid(8, 6, 4, periodic=True) == (8, 6)


@pytest.mark.parametrize("periodic", [False, True])
def test_gather_equals_rows_of_extract(periodic):
    img = _img(h=7, w=9)
    rows, cols = patch_grid(7, 9, 3, periodic)
    positions = torch.tensor([0, rows * cols - 1, 5, 17, 5, cols])
    full = extract_patches(img, 3, periodic=periodic)
    assert torch.equal(gather_patches(img, 3, positions, periodic), full[:, positions])
    with pytest.raises(ValueError, match="positions"):
        gather_patches(img, 3, torch.tensor([rows * cols]), periodic)


@pytest.mark.parametrize("periodic", [False, True])
def test_random_patches_are_distinct_rows_of_extract(periodic):
    img = _img(h=9, w=8)
    full = extract_patches(img, 3, periodic=periodic)                       # [B, N, D]
    n = 20
    got = random_patches(img, 3, n, torch.Generator().manual_seed(3), periodic)
    assert got.shape == (2, n, 27)
    equal = (got[0][:, None, :] == full[0][None, :, :]).all(dim=2)          # [n, N]
    assert bool(equal.any(dim=1).all())                                     # each row is a patch
    index = equal.int().argmax(dim=1)
    assert index.unique().numel() == n                                      # without replacement
    assert torch.equal(got[1], full[1, index])                              # same positions in the batch
    again = random_patches(img, 3, n, torch.Generator().manual_seed(3), periodic)
    assert torch.equal(got, again)
    other = random_patches(img, 3, n, torch.Generator().manual_seed(4), periodic)
    assert not torch.equal(got, other)
    everything = random_patches(img, 3, full.shape[1], torch.Generator().manual_seed(0), periodic)
    assert torch.equal(everything.sort(dim=1).values, full.sort(dim=1).values)


def test_random_patches_n_out_of_range():
    img = _img(h=4, w=4)
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        random_patches(img, 3, 5)
    with pytest.raises(ValueError, match="n must be"):
        random_patches(img, 3, 0)


@pytest.mark.parametrize("periodic", [False, True])
def test_gradients(periodic):
    img = _img(b=1, c=2, h=4, w=5, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: extract_patches(x, 2, 1, periodic), (img,), fast_mode=True)
    assert torch.autograd.gradcheck(
        lambda x: random_patches(x, 3, 4, torch.Generator().manual_seed(0), periodic), (img,), fast_mode=True)
    # every pixel lies in p² periodic patches: the gradient of the sum of all patches is p² everywhere
    out = extract_patches(img, 2, 1, periodic)
    (grad,) = torch.autograd.grad(out.sum(), img)
    if periodic:
        assert torch.equal(grad, torch.full_like(grad, 4.0))


def test_too_small_image_errors_name_the_sizes():
    img = _img(h=3, w=5)
    for call in (lambda: extract_patches(img, 4), lambda: random_patches(img, 4, 1),
                 lambda: extract_patches(img, 4, periodic=True)):
        with pytest.raises(ValueError, match=r"3x5.*4x4"):
            call()
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        extract_patches(img[0], 2)
    with pytest.raises(ValueError, match="stride"):
        extract_patches(img, 2, 0)


def test_n_scales_for():
    assert n_scales_for(256, 256) == 5          # 256, 128, 64, 32, 16
    assert n_scales_for(255, 300) == 4          # 255, 127, 63, 31 (15 < 16)
    assert n_scales_for(10, 40) == 1
    assert n_scales_for(64, 64, min_side=4) == 5
    for h, w, m in [(100, 37, 8), (130, 70, 16), (33, 33, 16)]:
        levels = gaussian_pyramid(torch.zeros(1, 1, h, w), n_scales_for(h, w, m))
        assert min(levels[-1].shape[-2:]) >= m and min(levels[-1].shape[-2:]) // 2 < m


def test_pyramid_shapes_and_constants():
    img = torch.full((2, 3, 37, 20), 0.25)
    levels = gaussian_pyramid(img, 3)
    assert [tuple(x.shape[-2:]) for x in levels] == [(37, 20), (18, 10), (9, 5)]
    assert levels[0] is img
    for x in gaussian_pyramid(img, 3, periodic=True):
        torch.testing.assert_close(x, torch.full_like(x, 0.25))
    with pytest.raises(ValueError, match="too many"):
        gaussian_pyramid(img, 6)


def test_periodic_pyramid_commutes_with_wraparound_shifts():
    img = _img(b=1, h=16, w=24, dtype=torch.float64)
    shifted = torch.roll(img, shifts=(4, -8), dims=(2, 3))
    levels, levels_shifted = gaussian_pyramid(img, 3, periodic=True), gaussian_pyramid(shifted, 3, periodic=True)
    for s, (x, y) in enumerate(zip(levels, levels_shifted)):
        torch.testing.assert_close(y, torch.roll(x, shifts=(4 >> s, -8 >> s), dims=(2, 3)))
    # the reflect-padded pyramid does not tile: the same shift breaks the relation at level 1
    plain, plain_shifted = gaussian_pyramid(img, 2), gaussian_pyramid(shifted, 2)
    assert not torch.allclose(plain_shifted[1], torch.roll(plain[1], shifts=(2, -4), dims=(2, 3)))


def test_pyramid_gradient():
    img = _img(b=1, c=1, h=8, w=8, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: gaussian_pyramid(x, 3, periodic=True)[-1], (img,), fast_mode=True)


@pytest.mark.parametrize("h, w, p", [(9, 12, 4), (5, 5, 4), (4, 7, 4), (16, 16, 1), (6, 9, 3)])
def test_patch_coverage_counts_the_patches_holding_each_pixel(h, w, p):
    """Against an independent count: fold(unfold(ones)) sums, at each pixel, the valid p×p patches that hold it."""
    import torch.nn.functional as F

    ones = torch.ones(1, 1, h, w, dtype=torch.float64)
    counts = F.fold(F.unfold(ones, p), (h, w), p)[0, 0]
    assert torch.allclose(patch_coverage(h, w, p, dtype=torch.float64), counts / counts.max())
    if min(h, w) >= 2 * p - 1:  # an interior pixel exists: the corner's share is 1/p²
        assert float(patch_coverage(h, w, p)[0, 0]) == pytest.approx(1 / p ** 2)
    assert torch.equal(patch_coverage(h, w, p, periodic=True), torch.ones(h, w))
    with pytest.raises(ValueError, match="holds no"):
        patch_coverage(p - 1, w, p) if p > 1 else patch_coverage(0, w, p)


@pytest.mark.parametrize("periodic", [False, True])
def test_coverage_scaled_keeps_values_and_scales_the_gradient(periodic):
    x = torch.rand(2, 3, 10, 12, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, 3, 10, 12, dtype=torch.float64)
    y = coverage_scaled(x, 4, periodic)
    assert torch.allclose(y, x, rtol=1e-15, atol=0)
    (grad,) = torch.autograd.grad((y * w).sum(), x)
    assert torch.allclose(grad, w * patch_coverage(10, 12, 4, periodic, dtype=torch.float64))
