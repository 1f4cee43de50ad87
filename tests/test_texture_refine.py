"""The patch projection of imgmw.texture_refine: exact chunked search, fixed points, what it repairs, determinism,
tileability, bounded memory and clear errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from imgmw.image import load_image
from imgmw.metrics import near_copy_fraction, seam_energy, structure_distance
from imgmw.texture_refine import _grid, nearest_patches, project_patches, refine_n_scales, refine_texture

ROOT = Path(__file__).resolve().parent.parent


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("budget", [1, 7, 10_000])
def test_chunked_search_equals_brute_force(budget):
    g = _gen()
    queries, bank = torch.randn(37, 12, generator=g, dtype=torch.float64), torch.randn(53, 12, generator=g,
                                                                                      dtype=torch.float64)
    cost = torch.cdist(queries, bank).square()
    index, sq = nearest_patches(queries, bank, budget=budget)
    assert torch.equal(index, cost.argmin(1))
    assert torch.allclose(sq, cost.min(1).values)
    given = nearest_patches(queries, bank, bank_sq=bank.square().sum(1), budget=budget)[0]
    assert torch.equal(given, index)
    index, sq = nearest_patches(bank[[4, 9]], bank, budget=budget)   # a bank row is its own neighbour, at 0
    assert index.tolist() == [4, 9] and torch.equal(sq, torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("periodic", [False, True])
@pytest.mark.parametrize("size, patch, stride", [(20, 8, 2), (17, 5, 3), (8, 8, 4), (33, 8, 8)])
def test_patch_grid_covers_every_pixel_inside_the_image(size, patch, stride, periodic):
    for offset in range(stride):
        pixels = _grid(size, patch, stride, offset, periodic, torch.device("cpu"))
        assert pixels.min() >= 0 and pixels.max() < size and set(pixels.tolist()) == set(range(size))
        starts = pixels.view(-1, patch)
        if not periodic:   # whole patches inside the image: consecutive pixels
            assert torch.equal(starts - starts[:, :1], torch.arange(patch).expand_as(starts))


@pytest.mark.parametrize("robust", [2.0, 0.8])
def test_an_exemplar_is_a_fixed_point(robust):
    ex = torch.rand(1, 3, 40, 36, generator=_gen(), dtype=torch.float64)
    out, energy = project_patches(ex, ex, patch=6, n_iter=2, stride=2, robust=robust, generator=_gen())
    assert torch.allclose(out, ex, atol=1e-12) and energy.max() < 1e-20
    # and over the pyramid: each level's start keeps the image's own detail
    assert torch.allclose(refine_texture(ex, ex, patch=6, n_iter=1, n_scales=2, generator=_gen()), ex[0], atol=1e-6)


def test_the_projection_energy_decreases_with_plain_averaging():
    g = _gen(1)
    ex = torch.rand(1, 3, 32, 32, generator=g)
    image = torch.rand(1, 3, 40, 40, generator=g)
    _, energy = project_patches(image, ex, patch=6, n_iter=6, stride=6, robust=2.0, generator=g)
    assert energy[-1] < 0.6 * energy[0]


@pytest.mark.parametrize("name", ["stripes", "bricks"])
def test_projection_repairs_a_blurred_and_broken_crop(name):
    """Another crop of the drawn exemplar, blurred (soft edges) or also cut into shuffled blocks (broken
    structure): the projection lowers the structure distance to the exemplar, the blurred bricks' to within
    1.3x that of the undamaged crop."""
    img = load_image(ROOT / "data" / f"{name}.png")
    ex, crop = img[:, :96, :128], img[:, 128:224, 128:224]
    blurred = torch.nn.functional.avg_pool2d(crop[None], 5, stride=1, padding=2, count_include_pad=False)[0]
    blocks = blurred.unfold(1, 24, 24).unfold(2, 24, 24).reshape(3, 16, 24, 24)
    order = torch.randperm(16, generator=_gen())
    broken = blocks[:, order].reshape(3, 4, 4, 24, 24).permute(0, 1, 3, 2, 4).reshape(3, 96, 96)
    for damaged in (blurred, broken) if name == "bricks" else (broken,):  # blurred stripes already score as the crop
        out = refine_texture(damaged, ex, generator=_gen())
        assert out.shape == damaged.shape and out.min() >= 0 and out.max() <= 1
        before, after = structure_distance(damaged, ex), structure_distance(out, ex)
        assert after < 0.9 * before, (before, after)
        assert near_copy_fraction(out, ex) < 1.0
    if name == "bricks":
        repaired = refine_texture(blurred, ex, generator=_gen())
        assert structure_distance(repaired, ex) < 1.3 * structure_distance(crop, ex)


def test_deterministic_for_a_fixed_seed_and_seed_dependent():
    g = _gen(2)
    ex, image = torch.rand(3, 48, 48, generator=g), torch.rand(3, 64, 64, generator=g)
    a, b = (refine_texture(image, ex, n_iter=2, generator=_gen(5)) for _ in range(2))
    c = refine_texture(image, ex, n_iter=2, generator=_gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_periodic_projection_keeps_an_image_tileable():
    img = load_image(ROOT / "data" / "stripes.png")
    ex = img[:, :128, :128]
    start = torch.roll(img[:, 128:, 128:], (10, 10), dims=(1, 2))   # a crop, seam rolled into the middle
    start = torch.nn.functional.avg_pool2d(start[None], 3, stride=1, padding=1, count_include_pad=False)[0]
    tile = refine_texture(start, ex, n_iter=2, periodic=True, generator=_gen())
    assert seam_energy(tile)["ratio"] < 2.0


def test_levels_follow_the_smaller_image():
    assert refine_n_scales((256, 256), (256, 256)) == 3
    assert refine_n_scales((256, 128), (64, 64)) == 2
    assert refine_n_scales((20, 20), (20, 20)) == 1


@pytest.mark.parametrize("kwargs, match", [
    ({"patch": 0}, "patch"), ({"n_iter": 0}, "n_iter"), ({"stride": 9}, "stride"), ({"robust": 3.0}, "robust"),
    ({"robust": -20.0}, "robust"),
    ({"n_scales": 6}, "too small")])
def test_bad_arguments_are_named(kwargs, match):
    ex = torch.rand(3, 40, 40, generator=_gen())
    with pytest.raises(ValueError, match=match):
        refine_texture(ex, ex, **kwargs)


def test_bad_images_are_named():
    ex = torch.rand(3, 40, 40, generator=_gen())
    with pytest.raises(ValueError, match="image"):
        refine_texture(torch.rand(2, 3, 40, 40), ex)
    with pytest.raises(ValueError, match="finite"):
        refine_texture(ex.clone().fill_(float("nan")), ex)
    with pytest.raises(ValueError, match="channels"):
        refine_texture(torch.rand(1, 40, 40), ex)
    with pytest.raises(ValueError, match="share D"):
        nearest_patches(torch.rand(3, 4), torch.rand(5, 6))


@pytest.mark.slow
def test_a_large_output_is_searched_in_chunks():
    """A 1024×1024 projection against a 128×128 exemplar: at stride 8 its 16384 patches against 14641 exemplar
    positions would need 0.96 GB of distances at once; chunked (PAIR_BUDGET) and unfolded in strips, the
    process's peak RSS grows by much less."""
    import resource

    g = _gen()
    ex = torch.rand(3, 128, 128, generator=g)
    image = torch.rand(3, 1024, 1024, generator=g)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = refine_texture(image, ex, n_iter=1, n_scales=1, stride=8, generator=g)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert out.shape == image.shape and grown_mb < 400, grown_mb
