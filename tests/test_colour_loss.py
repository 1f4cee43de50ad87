"""The sliced colour W2² loss (imgmw.colour_loss): values against POT, invariances, gradients, bad input."""
import math

import ot
import pytest
import torch

from imgmw.colour_loss import SlicedColourLoss


def _image(seed: int, c: int = 3, h: int = 12, w: int = 10, dtype=torch.float64) -> torch.Tensor:
    return torch.rand(1, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_equal_sizes_match_pots_sliced_wasserstein_on_the_same_directions():
    """With as many kept quantiles as exemplar pixels and an image of the same size, the loss is the exact sliced
    W2² between the two pixel sets: POT's ``sliced_wasserstein_distance`` squared, along the loss's directions."""
    exemplar, image = _image(0)[0], _image(1)
    loss = SlicedColourLoss(exemplar, n_directions=16, n_quantiles=120, seed=3)
    x, y = image[0].reshape(3, -1).T.numpy(), exemplar.reshape(3, -1).T.numpy()
    ref = ot.sliced_wasserstein_distance(x, y, projections=loss.directions.T.numpy(), p=2) ** 2
    assert loss(image).item() == pytest.approx(ref, rel=1e-12)


def test_a_colour_shift_costs_its_projected_length_and_a_pixel_permutation_nothing():
    """Translating every pixel by ``c`` moves each projected distribution by ``θ·c``: the loss is mean_p (θ_p·c)²
    (up to the quantile grid, here exact); permuting the pixels leaves the loss at its value for the exemplar."""
    exemplar = _image(2, h=16, w=16)
    loss = SlicedColourLoss(exemplar, n_directions=32, n_quantiles=256)
    c = torch.tensor([0.1, -0.2, 0.05], dtype=torch.float64)
    expected = (loss.directions @ c).square().mean().item()
    assert loss(exemplar + c.view(1, 3, 1, 1)).item() == pytest.approx(expected, rel=1e-12)
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    shuffled = exemplar.flatten(2)[..., perm].reshape(exemplar.shape)
    assert loss(exemplar).item() == pytest.approx(0.0, abs=1e-28)
    assert loss(shuffled).item() == pytest.approx(0.0, abs=1e-28)


def test_other_sizes_read_the_exemplar_quantiles_and_batches_average():
    """An image of another size compares against the exemplar's quantile function: a 4× upsampled exemplar
    (each pixel repeated 16 times, the same distribution) scores 0 and a uniform noise image does not; a batch
    scores the mean of its images."""
    exemplar = _image(4, h=8, w=8)
    loss = SlicedColourLoss(exemplar, n_directions=8, n_quantiles=64)
    up = exemplar.repeat_interleave(4, -1).repeat_interleave(4, -2)
    noise = _image(5, h=32, w=32)
    assert loss(up).item() == pytest.approx(0.0, abs=1e-28) and loss(noise).item() > 1e-4
    both = torch.cat([up, noise])
    assert loss(both).item() == pytest.approx((loss(up) + loss(noise)).item() / 2, rel=1e-12)


def test_rare_bright_pixels_are_seen():
    """A dark exemplar with 1 % bright pixels: an image without them scores clearly worse than one with them,
    which a mean/covariance match would hardly tell apart."""
    g = torch.Generator().manual_seed(0)
    dark = 0.05 * torch.rand(1, 3, 40, 40, generator=g, dtype=torch.float64)
    starry = dark.clone().flatten(2)
    starry[..., torch.randperm(1600, generator=g)[:16]] = 1.0
    starry = starry.reshape(dark.shape)
    loss = SlicedColourLoss(starry[0], n_directions=16, n_quantiles=1600)
    other = 0.05 * torch.rand(1, 3, 40, 40, generator=g, dtype=torch.float64).flatten(2)
    other[..., torch.randperm(1600, generator=g)[:16]] = 1.0
    assert loss(other.reshape(dark.shape)).item() < 0.05 * loss(dark).item()


def test_gradcheck_float64():
    exemplar = _image(6, h=6, w=5)
    loss = SlicedColourLoss(exemplar, n_directions=5, n_quantiles=17)
    image = _image(7, h=4, w=4).requires_grad_()
    assert torch.autograd.gradcheck(loss, (image,))


def test_float32_images_and_one_channel():
    """The loss follows the image's dtype; a one-channel exemplar gives one-channel directions (±1)."""
    grey = SlicedColourLoss(_image(8, c=1)[0], n_directions=4)
    assert grey.directions.abs().flatten().tolist() == pytest.approx([1.0] * 4)
    value = grey(_image(9, c=1, dtype=torch.float32))
    assert value.dtype == torch.float32 and math.isfinite(value.item())


@pytest.mark.parametrize("bad, match", [
    (torch.rand(2, 3, 4, 4), "exemplar must be"),
    ("img.png", "exemplar must be"),
    (torch.full((3, 4, 4), float("nan")), "finite"),
    (torch.ones(3, 4, 4, dtype=torch.int64), "floating-point"),
])
def test_bad_exemplars_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        SlicedColourLoss(bad)


def test_bad_arguments_and_images_raise():
    exemplar = _image(10)[0]
    for name in ("n_directions", "n_quantiles"):
        for value in (0, 2.5, True):
            with pytest.raises(ValueError, match=name):
                SlicedColourLoss(exemplar, **{name: value})
    loss = SlicedColourLoss(exemplar)
    for image in (torch.rand(3, 8, 8), torch.rand(1, 1, 8, 8), None):
        with pytest.raises(ValueError, match="image must be"):
            loss(image)


def _trainer(weight, seed: int = 0):
    from imgmw.texture import PatchMW2Loss
    from imgmw.texture_net import TextureGenerator, TextureGeneratorTrainer

    torch.manual_seed(seed)
    exemplar = torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed)
    loss = PatchMW2Loss(exemplar, patch=3, n_components=2, n_scales=2, n_patches=256, generator=gen)
    return TextureGeneratorTrainer(TextureGenerator(n_scales=3, channels=4), loss, size=(32, 32), lr=5e-3, seed=seed,
                                   colour=SlicedColourLoss(exemplar), colour_weight=weight)


def test_texture_trainer_adds_the_weighted_colour_loss_of_the_same_sample():
    """The first step's objective is Σ_s MW2² + λ·L on one sample: with λ = 100 it exceeds λ = 0's by 100 × the
    colour loss of the untrained network's first sample (the same noise and weights in all three trainers)."""
    base, weighted, probe = _trainer(0.0), _trainer(100.0), _trainer(0.0)
    image = probe.net(probe.net.noise(1, probe.size, probe.rng))
    expected = 100.0 * probe.colour(image).item()
    assert expected > 1e-3
    assert weighted.step() - base.step() == pytest.approx(expected, rel=1e-4)


def test_texture_trainer_refuses_bad_colour_weights():
    for bad in (-1.0, float("inf"), True):
        with pytest.raises(ValueError, match="colour_weight"):
            _trainer(bad)
