"""Speckle removal (imgmw.texture_despeckle): off-texture single pixels go, the exemplar's own details stay."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from imgmw.image import load_image
from imgmw.texture_despeckle import _excess, _patches, remove_speckles, speckle_threshold

DATA = Path(__file__).resolve().parent.parent / "data"


def _stars(generator: torch.Generator, size: int = 48, n: int = 20) -> torch.Tensor:
    """A dark noisy field with ``n`` isolated bright blue pixels (never on the border)."""
    img = 0.1 + 0.01 * torch.rand(3, size, size, generator=generator, dtype=torch.float64)
    ys = torch.randint(2, size - 2, (n,), generator=generator)
    xs = torch.randint(2, size - 2, (n,), generator=generator)
    img[:, ys, xs] = torch.tensor([0.3, 0.5, 0.9], dtype=torch.float64)[:, None]
    return img


def test_the_excess_is_what_the_centre_adds_by_brute_force():
    g = torch.Generator().manual_seed(0)
    q, bank = torch.rand(7, 27, generator=g, dtype=torch.float64), torch.rand(40, 27, generator=g, dtype=torch.float64)
    excess, index = _excess(q, bank)
    ring = [i for i in range(27) if i not in (4, 13, 22)]
    full = torch.cdist(q, bank).square().min(1).values
    ring_d = torch.cdist(q[:, ring], bank[:, ring]).square()
    torch.testing.assert_close(excess, full - ring_d.min(1).values)
    assert torch.equal(index, ring_d.argmin(1)) and bool((excess >= 0).all())


def test_patches_are_in_unfold_order_with_the_centre_at_4_13_22():
    img = torch.arange(3 * 5 * 6, dtype=torch.float64).reshape(3, 5, 6)
    p = _patches(img)
    assert p.shape == (3 * 4, 27)
    torch.testing.assert_close(p[0, [4, 13, 22]], img[:, 1, 1])      # first patch: rows 0-2, cols 0-2
    torch.testing.assert_close(p[6, [4, 13, 22]], img[:, 2, 3])      # row 1, col 2 of the 3 × 4 grid of patches


def test_an_off_colour_pixel_on_a_flat_region_is_replaced_by_the_regions_colour():
    g = torch.Generator().manual_seed(1)
    exemplar = torch.zeros(3, 40, 40, dtype=torch.float64)
    exemplar[0], exemplar[1, :, 10:20], exemplar[1, :, 30:] = 0.8, 0.6, 0.6   # flat red and yellow bands
    image = exemplar.clone()
    image[:, 10, 5] = torch.tensor([0.2, 0.2, 0.9], dtype=torch.float64)   # a blue speckle on red
    image[:, 30, 33] = torch.tensor([0.8, 0.0, 0.0], dtype=torch.float64)  # a red speckle on yellow
    out, n = remove_speckles(image, exemplar, generator=g)
    assert n == 2
    torch.testing.assert_close(out, exemplar)


def test_the_exemplars_own_isolated_details_stay():
    g = torch.Generator().manual_seed(2)
    exemplar, image = _stars(g), _stars(g)
    out, n = remove_speckles(image, exemplar, generator=g)
    bright = image[2] > 0.5
    torch.testing.assert_close(out[:, bright], image[:, bright])     # every star is still there
    assert n <= 0.02 * image[0].numel()


def test_an_exemplar_crop_is_nearly_untouched_and_a_speckled_one_is_repaired():
    g = torch.Generator().manual_seed(3)
    img = load_image(DATA / "stripes.png")
    exemplar, crop = img[:, :, :128], img[:, :96, 128:224].clone()
    out, n = remove_speckles(crop, exemplar, generator=g)
    assert n <= 0.01 * 96 * 96
    speckled = crop.clone()
    ys, xs = torch.randint(2, 94, (60,), generator=g), torch.randint(2, 94, (60,), generator=g)
    speckled[:, ys, xs] = torch.rand(3, 60, generator=g)
    repaired, _ = remove_speckles(speckled, exemplar, generator=g)
    visible = (speckled - crop).abs().amax(0)[ys, xs] > 0.2
    fixed = (repaired - crop).abs().amax(0)[ys, xs] < 0.1
    assert int(visible.sum()) >= 50 and int((visible & fixed).sum()) >= 0.9 * int(visible.sum())


def test_a_noisy_texture_gets_a_wider_threshold_than_a_flat_drawn_one():
    g = torch.Generator().manual_seed(4)
    stripes, gravel = load_image(DATA / "stripes.png"), load_image(DATA / "gravel.png")
    assert speckle_threshold(gravel, generator=g) > 4 * speckle_threshold(stripes, generator=g)
    assert speckle_threshold(torch.rand(3, 4, 40), generator=g) is not None
    assert speckle_threshold(torch.rand(3, 5, 5), generator=g) is None   # halves of 2 px: no 3×3 patch


def test_periodic_searches_the_border():
    g = torch.Generator().manual_seed(5)
    exemplar = torch.full((3, 30, 30), 0.5, dtype=torch.float64)
    exemplar[:, ::2] += 0.1                                           # horizontal lines, period 2
    image = exemplar.clone()
    image[:, 0, 7] = 0.0                                              # a dark pixel on the top row
    _, n_plain = remove_speckles(image, exemplar, generator=torch.Generator().manual_seed(5))
    out, n_periodic = remove_speckles(image, exemplar, periodic=True, generator=g)
    assert n_plain == 0 and n_periodic >= 1
    torch.testing.assert_close(out, exemplar)


def test_deterministic_for_a_fixed_seed_and_keeps_dtype_and_shape():
    img = load_image(DATA / "stripes.png")
    noisy = img[:, :64, 128:192].clone().float()
    noisy[:, 20:40:3, 10:50:5] = 0.0
    a, na = remove_speckles(noisy[None], img[:, :, :128], generator=torch.Generator().manual_seed(0))
    b, nb = remove_speckles(noisy, img[:, :, :128], generator=torch.Generator().manual_seed(0))
    assert a.shape == (3, 64, 64) and a.dtype == torch.float32 and na == nb > 0 and torch.equal(a, b)


@pytest.mark.parametrize("kwargs, match", [({"quantile": 1.0}, "quantile"), ({"quantile": 0}, "quantile"),
                                           ({"passes": 0}, "passes"), ({"passes": True}, "passes")])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        remove_speckles(torch.rand(3, 8, 8), torch.rand(3, 8, 8), **kwargs)


def test_bad_images_are_named():
    with pytest.raises(ValueError, match="image"):
        remove_speckles(torch.rand(2, 3, 8, 8), torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="3 channels"):
        remove_speckles(torch.rand(1, 8, 8), torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="exemplar"):
        remove_speckles(torch.rand(3, 8, 8), torch.full((3, 8, 8), float("nan")))
