"""The nearest-exemplar-patch energy (imgmw.patch_energy): values, gradients, sampling and its use in training."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from imgmw.patch_energy import NearestPatchEnergy
from imgmw.patches import gaussian_pyramid
from imgmw.texture import PatchMW2Loss
from imgmw.texture_net import TextureGenerator, TextureGeneratorTrainer
from tests.app_checks import assert_resumes_exactly


def _exemplar(size: int = 32, dtype=torch.float32) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    stripes = 0.5 + 0.4 * torch.sin(xx * 0.7 + 0.4 * yy)
    g = torch.Generator().manual_seed(0)
    img = torch.stack([stripes, 1 - stripes, 0.3 + 0.2 * stripes]) + 0.05 * torch.rand(3, size, size, generator=g)
    return img.clamp(0, 1).to(dtype)


def _brute_force(image: torch.Tensor, exemplar: torch.Tensor, patch: int, stride: int, n_scales: int) -> torch.Tensor:
    """Σ_s mean_j min_e ‖R_j x_s − e‖² / D / S from every patch pair, by a dense distance matrix."""
    total = torch.zeros((), dtype=image.dtype)
    for x, u in zip(gaussian_pyramid(image, n_scales), gaussian_pyramid(exemplar[None], n_scales)):
        q = F.unfold(x, patch, stride=stride).transpose(1, 2).flatten(0, 1)
        bank = F.unfold(u, patch)[0].T
        total = total + torch.cdist(q, bank).square().min(1).values.mean() / q.shape[1]
    return total / n_scales


def test_energy_equals_the_brute_force_minimum_and_is_zero_on_the_exemplar():
    exemplar = _exemplar(dtype=torch.float64)
    energy = NearestPatchEnergy(exemplar, patch=4, n_scales=2, stride=2, n_bank=10**6, n_queries=10**6)
    g = torch.Generator().manual_seed(1)
    noise = torch.rand(2, 3, 24, 20, generator=g, dtype=torch.float64)
    assert torch.allclose(energy(noise), _brute_force(noise, exemplar, 4, 2, 2), rtol=1e-10)
    assert float(energy(noise)) > 1e-3
    assert float(energy(exemplar[None])) < 1e-20


def test_gradient_matches_finite_differences_in_float64():
    """The matches are piecewise constant, so away from ties the energy is a quadratic in the pixels."""
    exemplar = _exemplar(16, torch.float64)
    energy = NearestPatchEnergy(exemplar, patch=4, n_scales=2, stride=2, n_bank=10**6, n_queries=10**6)
    x = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64,
                   requires_grad=True)
    assert torch.autograd.gradcheck(energy, (x,), eps=1e-7, atol=1e-8)


def test_subsets_are_drawn_from_the_generator():
    exemplar = _exemplar(48)
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    values = []
    for _ in range(2):
        energy = NearestPatchEnergy(exemplar, patch=4, n_scales=2, n_bank=200, n_queries=50,
                                    generator=torch.Generator().manual_seed(4))
        assert energy.bank0.shape == (200, 48) and energy.bank1.shape == (200, 48)
        values.append([float(energy(images)) for _ in range(2)])
    assert values[0] == values[1]            # same seed, same draws
    assert values[0][0] != values[0][1]      # each call draws its own queries


def test_periodic_images_use_patches_across_the_border():
    """With ``periodic=True`` the patches wrap around: a rolled exemplar tile has the same energy as the tile
    (every wrapped patch is one of the tile's own patches, which the bank holds when the exemplar is the tile
    repeated 2×2)."""
    tile = _exemplar(16, torch.float64)
    bank_image = tile.repeat(1, 2, 2)
    energy = NearestPatchEnergy(bank_image, patch=4, n_scales=1, stride=1, n_bank=10**6, n_queries=10**6,
                                periodic=True)
    rolled = tile.roll((5, 7), dims=(-2, -1))[None]
    assert float(energy(rolled)) < 1e-20
    assert float(NearestPatchEnergy(tile, patch=4, n_scales=1, stride=1)(rolled)) > 1e-4


def test_default_levels_and_bad_arguments():
    assert NearestPatchEnergy(_exemplar(64)).n_scales == 2      # 64 → 32 keeps sides >= 32
    assert NearestPatchEnergy(_exemplar(128)).n_scales == 3
    with pytest.raises(ValueError, match="too small"):
        NearestPatchEnergy(_exemplar(16), patch=8, n_scales=3)   # level 2 is 4×4
    with pytest.raises(ValueError, match="n_bank"):
        NearestPatchEnergy(_exemplar(), n_bank=0)
    energy = NearestPatchEnergy(_exemplar(), patch=4, n_scales=2)
    with pytest.raises(ValueError, match="too small"):
        energy(torch.rand(1, 3, 6, 6))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        energy(torch.rand(3, 16, 16))


def _trainer(weight: float, seed: int = 0) -> TextureGeneratorTrainer:
    torch.manual_seed(seed)
    exemplar = _exemplar(48)
    gen = torch.Generator().manual_seed(seed)
    loss = PatchMW2Loss(exemplar, patch=3, n_components=2, n_scales=2, n_patches=256, generator=gen)
    nearest = NearestPatchEnergy(exemplar, patch=4, n_scales=2, n_bank=500, n_queries=100, generator=gen)
    return TextureGeneratorTrainer(TextureGenerator(n_scales=3, channels=4), loss, size=(32, 32), lr=5e-3,
                                   seed=seed, nearest=nearest, nearest_weight=weight)


def test_trainer_adds_the_weighted_energy_and_resumes_exactly():
    """The step's objective is Σ_s MW2² + λ·E on the same sample: the first step's value grows by λ·E."""
    base, weighted = _trainer(0.0), _trainer(100.0)
    first = base.step(), weighted.step()
    assert first[1] > first[0] + 1e-3
    assert_resumes_exactly(lambda: _trainer(100.0), 2, 2, copy.deepcopy)


def test_trainer_refuses_bad_weights():
    for bad in (-1.0, float("inf"), True):
        with pytest.raises(ValueError, match="nearest_weight"):
            _trainer(bad)
