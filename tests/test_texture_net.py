"""The feed-forward texture generator (imgmw.texture_net): shapes at any size, periodicity, training and resume."""
from __future__ import annotations

import copy

import pytest
import torch

from imgmw.texture import PatchMW2Loss
from tests.app_checks import assert_resumes_exactly
from imgmw.texture_net import TextureGenerator, TextureGeneratorTrainer
from imgmw.texture_semidual import SemiDualPatchOT


def _exemplar() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    stripes = 0.5 + 0.4 * torch.sin(xx * 0.8 + 0.3 * yy)
    return (torch.stack([stripes, 1 - stripes, 0.5 * stripes]) + 0.05 * torch.rand(3, 48, 48, generator=g)).clamp(0, 1)


@pytest.mark.parametrize("size", [(16, 16), (37, 50), (64, 23)])
def test_samples_have_the_asked_size_and_range(size):
    torch.manual_seed(0)
    net = TextureGenerator(n_scales=4, channels=4)
    out = net.sample(2, size, torch.Generator().manual_seed(1))
    assert out.shape == (2, 3, *size)
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    again = net.sample(2, size, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_periodic_network_commutes_with_rolls_of_its_noise():
    """Circular padding: rolling every noise image by a multiple of its scale rolls the output the same way,
    so a sample is a function on the torus and tiles without a seam. Reflect padding breaks this."""
    torch.manual_seed(0)
    for periodic, equal in ((True, True), (False, False)):
        net = TextureGenerator(n_scales=3, channels=4, periodic=periodic).double()
        noise = net.noise(1, (32, 32), torch.Generator().manual_seed(2), dtype=torch.float64)
        shift = 8  # a multiple of 2^(n_scales - 1)
        rolled = [z.roll((shift >> s, shift >> s), dims=(-2, -1)) for s, z in enumerate(noise)]
        with torch.no_grad():
            a, b = net(noise), net(rolled)
        same = torch.allclose(a.roll((shift, shift), dims=(-2, -1)), b, atol=1e-12)
        assert same == equal


def test_periodic_network_refuses_sizes_it_cannot_tile():
    net = TextureGenerator(n_scales=3, periodic=True)
    with pytest.raises(ValueError, match="divisible by 4"):
        net.noise_shape((30, 32))
    with pytest.raises(ValueError, match="at least 8"):
        net.noise_shape((4, 32))
    assert net.noise_shape((32, 28)) == (32, 28)
    assert TextureGenerator(n_scales=3).noise_shape((30, 33)) == (32, 36)


def test_small_outputs_keep_two_coarse_noise_pixels():
    """Instance normalisation of a single pixel is undefined: a 16×16 sample of a 5-scale network runs on 32×32
    noise (coarsest 2×2) and is cropped."""
    net = TextureGenerator(n_scales=5, channels=4)
    assert net.noise_shape((16, 3)) == (32, 32)
    assert net.sample(1, (16, 3)).shape == (1, 3, 16, 3)


def test_output_does_not_depend_on_the_noise_scale():
    """Every noise image enters through a bias-free convolution and an instance normalisation, so scaling all
    noise by c > 0 leaves the sample unchanged: the network's outputs are normalised at every scale."""
    torch.manual_seed(0)
    net = TextureGenerator(n_scales=3, channels=4).double()
    noise = net.noise(2, (32, 40), torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        a, b = net(noise), net([3.0 * z for z in noise])
    assert torch.allclose(a, b, atol=1e-6)


def _trainer(seed: int = 0) -> TextureGeneratorTrainer:
    torch.manual_seed(seed)
    net = TextureGenerator(n_scales=3, channels=4)
    loss = PatchMW2Loss(_exemplar(), patch=3, n_components=2, n_scales=2, n_patches=256,
                        generator=torch.Generator().manual_seed(seed))
    return TextureGeneratorTrainer(net, loss, size=(32, 32), lr=5e-3, seed=seed)


def test_training_lowers_the_patch_loss():
    trainer = _trainer()
    history = trainer.train(40)
    assert sum(history[-5:]) < 0.8 * sum(history[:5]), history


def test_checkpoint_round_trip_resumes_exactly():
    state = assert_resumes_exactly(_trainer, 3, 3, copy.deepcopy)  # state_dict() shares the live tensors
    rebuilt = TextureGenerator(**state["config"])
    rebuilt.load_state_dict(state["net"])  # the config in a checkpoint rebuilds the network


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_scales"):
        TextureGenerator(n_scales=0)
    with pytest.raises(ValueError, match="noise images"):
        TextureGenerator(n_scales=2)([torch.zeros(1, 3, 8, 8)])
    with pytest.raises(ValueError, match="batch"):
        TextureGeneratorTrainer(TextureGenerator(n_scales=2), PatchMW2Loss(_exemplar(), n_scales=1), batch=0)


@pytest.mark.parametrize("periodic", [False, True])
@pytest.mark.parametrize("n, size", [(1, (64, 64)), (2, (48, 40))])
def test_inference_path_equals_the_autograd_path(periodic, n, size):
    """Without autograd the forward pass runs channels-last with the instance normalisation as a batch
    normalisation of each image's pixel matrix; it must give the autograd path's images (per image: a batch of
    two must not mix the images' statistics)."""
    torch.manual_seed(0)
    net = TextureGenerator(n_scales=3, channels=4, periodic=periodic).double()
    with torch.no_grad():  # non-trivial affine parameters, so a dropped γ or β would show
        for module in net.modules():
            if isinstance(module, torch.nn.InstanceNorm2d):
                module.weight.uniform_(-2, 2)
                module.bias.uniform_(-1, 1)
    noise = net.noise(n, size, torch.Generator().manual_seed(4), dtype=torch.float64)
    noise[-1][-1] *= 5.0  # images of a batch with different statistics
    reference = net(noise, size)
    assert reference.requires_grad
    with torch.no_grad():
        fast = net(noise, size)
    assert fast.shape == (n, 3, *size)
    assert torch.allclose(fast, reference.detach(), atol=1e-10)
    with torch.inference_mode():
        assert torch.allclose(net(noise, size), reference.detach(), atol=1e-10)
    sampled = net.sample(n, size, torch.Generator().manual_seed(4))
    assert sampled.shape == (n, 3, *size) and not sampled.is_inference()


def _grey_exemplar() -> torch.Tensor:
    return _exemplar()[:1].expand(3, -1, -1).contiguous()


def test_grey_network_trains_one_channel_and_samples_grey():
    """A grey exemplar's network has one output channel repeated three times: its samples are exactly grey (an RGB
    network trained on the same exemplar is not), and the config in a checkpoint rebuilds it."""
    exemplar = _grey_exemplar()
    samples = {}
    for out_channels in (1, 3):
        torch.manual_seed(0)
        net = TextureGenerator(n_scales=3, channels=4, out_channels=out_channels)
        assert net.to_rgb.out_channels == out_channels
        loss = PatchMW2Loss(exemplar, patch=3, n_components=2, n_scales=2, n_patches=256,
                            generator=torch.Generator().manual_seed(0))
        trainer = TextureGeneratorTrainer(net, loss, size=(32, 32), lr=5e-3, seed=0)
        history = trainer.train(15)
        assert history[-1] < history[0]
        samples[out_channels] = net.sample(2, (40, 24), torch.Generator().manual_seed(5))
        assert samples[out_channels].shape == (2, 3, 40, 24)
    grey = samples[1]
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])
    assert not torch.equal(samples[3][:, 0], samples[3][:, 1])
    state = copy.deepcopy(trainer.state_dict())  # the last trainer is RGB: build the grey one's state again
    torch.manual_seed(0)
    grey_net = TextureGenerator(n_scales=3, channels=4, out_channels=1)
    config = grey_net.config()
    assert config["out_channels"] == 1 and state["config"]["out_channels"] == 3
    rebuilt = TextureGenerator(**config)
    rebuilt.load_state_dict(grey_net.state_dict())
    assert torch.equal(rebuilt.sample(1, (32, 32), torch.Generator().manual_seed(6)),
                       grey_net.sample(1, (32, 32), torch.Generator().manual_seed(6)))
    with pytest.raises(RuntimeError):  # an RGB network's weights do not load into a grey one
        rebuilt.load_state_dict(state["net"])
    with pytest.raises(ValueError, match="out_channels"):
        TextureGenerator(out_channels=2)


def _semidual_trainer(weight: float, seed: int = 0, batch: int = 1) -> TextureGeneratorTrainer:
    """A small trainer with the semi-dual term; its duals draw from their own generator (seeded by ``seed``)."""
    torch.manual_seed(seed)
    net = TextureGenerator(n_scales=3, channels=4)
    loss = PatchMW2Loss(_exemplar(), patch=3, n_components=2, n_scales=2, n_patches=256,
                        generator=torch.Generator().manual_seed(seed))
    ot = SemiDualPatchOT(_exemplar(), torch.Generator().manual_seed(seed + 1), n_scales=2, n_targets=300,
                         psi_steps=2, psi_batch=200, image_patches=256)
    return TextureGeneratorTrainer(net, loss, size=(32, 32), batch=batch, lr=5e-3, seed=seed, semidual=ot,
                                   semidual_weight=weight)


@pytest.mark.parametrize("batch", [1, 2])
def test_trainer_adds_the_weighted_semidual_term_of_the_same_samples(batch):
    """The first step's objective is Σ_s MW2² + λ·mean_b Σ_s H_s(ψ̄_s, X_s): with λ = 10 it exceeds λ = 0's by 10 ×
    the term that a copy of the untrained trainer's semi-dual state gives the same first samples after the same
    ascent, and the ascent moved the duals (so the term is the dual-shifted cost, not the plain nearest patch)."""
    base, weighted, probe = (_semidual_trainer(w, batch=batch) for w in (0.0, 10.0, 0.0))
    image = probe.net(probe.net.noise(batch, probe.size, probe.rng))
    expected = 10.0 * probe.semidual.loss(image).item()
    assert expected > 1e-3
    assert weighted.step() - base.step() == pytest.approx(expected, rel=1e-4)
    assert all(float(p.abs().max()) > 0 for p in weighted.semidual.psi)
    assert all(float(p.abs().max()) == 0 for p in base.semidual.psi)  # weight 0: the term is not computed


def test_semidual_training_resumes_exactly_and_needs_the_duals():
    """The checkpoint carries the duals: a resumed run equals the uninterrupted one; a state without them (trained
    without the term) is refused."""
    state = assert_resumes_exactly(lambda: _semidual_trainer(10.0), 2, 2, copy.deepcopy)
    assert len(state["semidual_psi"]) == 2
    with pytest.raises(ValueError, match="semi-dual"):
        _semidual_trainer(10.0).load_state_dict(_trainer().state_dict())


def test_trainer_refuses_bad_semidual_weights():
    for bad in (-1.0, float("nan"), True):
        with pytest.raises(ValueError, match="semidual_weight"):
            _semidual_trainer(bad)
