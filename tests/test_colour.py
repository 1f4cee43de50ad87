"""Colour transfer: palette quantisation, the LUT approximation, the flows and the map."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from imgmw.colour import (apply_palette_lut, build_palette, colour_flow, fit_colour_gmm, from_scaled_space,
                          to_scaled_space, transfer_colours)
from imgmw.image import _resize, image_to_points, load_image, points_to_image
from imgmw.metrics import color_sliced_w2

DATA = Path(__file__).resolve().parent.parent / "data"


@pytest.fixture(scope="module")
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    source = _resize(load_image(DATA / "coffee.jpg"), (48, 72))
    target = _resize(load_image(DATA / "rocket.jpg"), (48, 72))
    return source, target


def test_palette_counts_and_means_reproduce_the_pixels(pair):
    source, _ = pair
    pal = build_palette(source, max_colors=500)
    pix = image_to_points(source)
    assert pal.colours.shape[0] <= 500
    assert float(pal.counts.sum()) == pix.shape[0]
    # the weighted palette has the image's mean colour exactly, and each pixel lies in its bin
    mean = (pal.colours * pal.counts[:, None]).sum(0) / pal.counts.sum()
    torch.testing.assert_close(mean, pix.mean(0), atol=1e-5, rtol=0)
    assert float((pix - pal.colours[pal.inverse]).abs().max()) <= 1.0 / pal.levels + 1e-6


def test_lut_with_constant_displacement_shifts_every_pixel(pair):
    source, _ = pair
    img = source * 0.5 + 0.2  # keep the shifted colours inside [0, 1]
    pal = build_palette(img)
    shift = torch.tensor([0.05, -0.03, 0.02])
    out = apply_palette_lut(img, pal, pal.colours + shift)
    torch.testing.assert_close(out, (img + shift[:, None, None]).clamp(0, 1), atol=1e-5, rtol=0)


def test_lut_with_identity_keeps_the_image(pair):
    source, _ = pair
    pal = build_palette(source)
    torch.testing.assert_close(apply_palette_lut(source, pal, pal.colours), source, atol=1e-6, rtol=0)


def test_colour_space_round_trip(pair):
    source, _ = pair
    pix = image_to_points(source)
    for space in ("rgb", "lab", "linear"):
        back = from_scaled_space(to_scaled_space(pix, space), space)
        torch.testing.assert_close(back, pix, atol=2e-4, rtol=0)


def test_palette_flow_is_close_to_the_full_pixel_flow(pair):
    """The documented approximation: the flow on the weighted palette, spread to the pixels by the LUT,
    against the same flow on every pixel (same target, same initial source GMM, no fit-keeping policy:
    its fresh fits would make the two runs differ by more than the approximation).

    A particle flow's per-pixel outcome is sensitive to its input (many arrangements of the pixels have
    the same fitted GMM), so the yardstick is the flow's own change under an invisible perturbation of
    the source (uniform noise of ±0.5/255): the LUT's error must be of that size, and the colour
    distribution it reaches as close to the target as the full flow's.
    """
    source, target = pair
    gen = torch.Generator().manual_seed(0)
    tgt = fit_colour_gmm(build_palette(target), "lab", 10, generator=gen)
    pix = to_scaled_space(image_to_points(source), "lab")
    ones = torch.ones(pix.shape[0])
    from imgmw import fit_gmm

    init = fit_gmm(pix, 10, n_iter=30, grad="none", generator=gen).gmm

    def full_flow(img: torch.Tensor) -> torch.Tensor:
        moved, _, _ = colour_flow(to_scaled_space(image_to_points(img), "lab"), ones, tgt, iters=40, init=init,
                                  policy=None)
        return points_to_image(from_scaled_space(moved, "lab"), *img.shape[-2:])

    full_img = full_flow(source)
    noise = (torch.rand(source.shape, generator=torch.Generator().manual_seed(1)) - 0.5) / 255
    sensitivity = float((full_flow((source + noise).clamp(0, 1)) - full_img).abs().mean())
    pal = build_palette(source)
    moved, _, _ = colour_flow(to_scaled_space(pal.colours, "lab"), pal.counts, tgt, iters=40, init=init, policy=None)
    lut_img = apply_palette_lut(source, pal, from_scaled_space(moved, "lab"))
    err = float((lut_img - full_img).abs().mean())
    assert err < 1.5 * sensitivity + 2 / 255
    sw_full, sw_lut = color_sliced_w2(full_img, target), color_sliced_w2(lut_img, target)
    assert sw_lut < 1.25 * sw_full


@pytest.mark.parametrize("space", ["rgb", "lab"])
def test_flow_lowers_loss_and_colour_distance(pair, space):
    source, target = pair
    result = transfer_colours(source, target, colorspace=space, luminance="match" if space == "lab" else "free",
                              regrain=False, iters=60, seed=0)
    assert result.image.shape == source.shape
    assert torch.isfinite(result.image).all()
    assert result.losses[-1] < 0.05 * result.losses[0]
    assert color_sliced_w2(result.image, target) < 0.5 * color_sliced_w2(source, target)


def test_map_methods_move_colours_towards_target(pair):
    source, target = pair
    before = color_sliced_w2(source, target)
    for map_method in ("bary", "rand"):
        result = transfer_colours(source, target, method="map", map_method=map_method, seed=0)
        assert result.image.shape == source.shape
        assert color_sliced_w2(result.image, target) < 0.5 * before


def test_unbalanced_flow_does_not_copy_an_outlier_colour(pair):
    """A green square (4% of the target, a colour absent from the source) is copied by the balanced flow
    but not by the unbalanced one (λ = (10, 0.1)); the flows alone, all three coordinates moving."""
    source, target = pair
    green = torch.tensor([0.0, 1.0, 0.0])
    planted = target.clone()
    planted[:, 4:16, 4:16] = green[:, None, None]

    def green_fraction(img: torch.Tensor) -> float:
        return float(((image_to_points(img) - green).norm(dim=-1) < 0.4).float().mean())

    assert green_fraction(source) == 0.0
    flows = dict(iters=100, seed=0, luminance="free", regrain=False, diagnose=False)
    balanced = transfer_colours(source, planted, method="flow", **flows)
    unbalanced = transfer_colours(source, planted, method="unbalanced", **flows)
    assert green_fraction(balanced.image) > 0.02
    assert green_fraction(unbalanced.image) < 0.2 * green_fraction(balanced.image)


def test_bad_arguments_raise(pair):
    source, target = pair
    with pytest.raises(ValueError, match="method"):
        transfer_colours(source, target, method="magic")
    with pytest.raises(ValueError, match="colorspace"):
        transfer_colours(source, target, colorspace="hsv")
    with pytest.raises(ValueError, match="k must"):
        transfer_colours(source, target, k=0)
    with pytest.raises(ValueError, match="needs colorspace='lab'"):
        transfer_colours(source, target, colorspace="rgb")
    with pytest.raises(ValueError, match="polish_iters"):
        transfer_colours(source, target, polish_iters=-1)
    flat = torch.full((3, 8, 8), 0.5)
    with pytest.raises(ValueError, match="distinct colours"):
        transfer_colours(flat, target)


def test_deterministic_for_a_seed(pair):
    source, target = pair
    a = transfer_colours(source, target, iters=20, seed=3).image
    b = transfer_colours(source, target, iters=20, seed=3).image
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------ structure of the transfer

def _ramp_and_two_colours() -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth horizontal grey ramp (the source) and a target of two colours, red and blue, with mild noise."""
    ramp = torch.linspace(0.15, 0.85, 96).view(1, 1, 96).expand(3, 32, 96).contiguous()
    g = torch.Generator().manual_seed(0)
    target = torch.empty(3, 32, 64)
    target[:, :, :32] = torch.tensor([0.8, 0.2, 0.2]).view(3, 1, 1)
    target[:, :, 32:] = torch.tensor([0.2, 0.3, 0.8]).view(3, 1, 1)
    return ramp, (target + 0.03 * torch.randn(target.shape, generator=g)).clamp(0, 1)


def test_a_smooth_ramp_stays_monotone_and_unsplit():
    """The default transfer keeps a smooth ramp smooth: its luminance stays monotone along the ramp and no
    step between neighbouring columns is larger than a tenth of the result's colour range. Measured, as a
    fraction of that range: the flow alone (all coordinates, no regrain) 0.45, with an unsmoothed polish
    0.14, the default 0.05."""
    import kornia.color as kc

    source, target = _ramp_and_two_colours()
    result = transfer_colours(source, target, k=2, iters=60, diagnose=False).image
    row = result.mean(1)                                           # [3, W]: the columns' mean colours
    lum = kc.rgb_to_lab(result[None])[0, 0].mean(0)
    assert bool((lum[1:] - lum[:-1] >= -1e-3).all())
    steps = (row[:, 1:] - row[:, :-1]).norm(dim=0)
    spread = (row.amax(1) - row.amin(1)).norm()
    assert float(steps.max()) < 0.1 * float(spread)


def test_velocity_smoother_averages_over_neighbouring_colours():
    from imgmw.colour import VelocitySmoother

    g = torch.Generator().manual_seed(0)
    colours = torch.rand(500, 3, generator=g, dtype=torch.float64)
    mass = torch.rand(500, generator=g, dtype=torch.float64) + 0.1
    smoother = VelocitySmoother(colours, mass, 0.1)
    constant = torch.tensor([[0.3, -0.2]], dtype=torch.float64).expand(500, 2)
    torch.testing.assert_close(smoother(constant), constant)               # a normalised average
    noise = torch.randn(500, 1, generator=g, dtype=torch.float64)
    assert float(smoother(noise).var()) < 0.2 * float(noise.var())
    ramp = colours[:, :1]                                                   # a linear field stays close
    assert float((smoother(ramp) - ramp).abs().median()) < 0.05
    with pytest.raises(ValueError, match="sigma"):
        VelocitySmoother(colours, mass, 0.0)
