"""Tests of imgmw.texture_semidual: the multi-scale patch semi-dual OT (Houdard et al.) and its use as the finish
of imgmw.texture.synthesize_texture."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from imgmw.colour_loss import SlicedColourLoss
from imgmw.patches import extract_patches, gaussian_pyramid
from imgmw.texture import synthesize_texture
from imgmw.texture_semidual import SemiDualPatchOT, semidual_cost, semidual_finish

ROOT = Path(__file__).resolve().parent.parent


def _exemplar(size: int = 48, seed: int = 0) -> torch.Tensor:
    """A structured colour exemplar ``[3, size, size]``: diagonal stripes with a little noise."""
    g = torch.Generator().manual_seed(seed)
    r = torch.arange(size, dtype=torch.float32)
    stripes = (torch.sin((r[:, None] + r[None, :]) * 0.6) > 0).float()
    img = torch.stack([0.2 + 0.6 * stripes, 0.3 + 0.3 * stripes, 0.7 - 0.5 * stripes])
    return (img + 0.03 * torch.randn(3, size, size, generator=g)).clamp(0, 1)


def _usage(ot: SemiDualPatchOT, image: torch.Tensor, s: int = 0) -> torch.Tensor:
    """Share of all patches of level ``s`` of ``image`` assigned to each target patch (current ψ)."""
    level = gaussian_pyramid(image[None], ot.n_scales)[s]
    idx = ot.assign(s, extract_patches(level, ot.patches[s])[0])
    return torch.bincount(idx, minlength=ot.targets[s].shape[0]).double() / idx.numel()


def test_psi_ascent_raises_the_dual_and_makes_target_use_uniform():
    ex = _exemplar()
    image = torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(1)) * 0.3 + 0.35  # grey-ish noise
    ot = SemiDualPatchOT(ex, torch.Generator().manual_seed(0), n_scales=1, n_targets=64, psi_batch=2000)
    zero = [torch.zeros_like(p) for p in ot.psi]
    before_cost = float(semidual_cost(ot, image, zero).sum())
    before = _usage(ot, image)
    ot.ascend_psi(gaussian_pyramid(image[None], 1), n_steps=400)
    after = _usage(ot, image)
    uniform = 1.0 / 64
    # ψ = 0 piles the noise onto a few targets; the ascent spreads it over all of them
    assert float((before - uniform).abs().sum()) > 1.0
    assert float((after - uniform).abs().sum()) < 0.5 * float((before - uniform).abs().sum())
    assert bool((after > 0).all()) and int((before > 0).sum()) < 0.75 * 64
    # H is concave in ψ and the ascent raised it (towards the OT cost)
    assert float(semidual_cost(ot, image).sum()) > before_cost


def _small_ot(dtype: torch.dtype = torch.float32, periodic: bool = False) -> SemiDualPatchOT:
    return SemiDualPatchOT(_exemplar(24).to(dtype), torch.Generator().manual_seed(3), n_scales=2, n_targets=50,
                           psi_steps=2, psi_batch=100, image_patches=64, periodic=periodic)


@pytest.mark.parametrize("periodic", [False, True])
def test_loss_of_a_batch_ascends_on_each_sample_in_turn_and_averages(periodic):
    """``loss`` of two samples is the mean of the two one-sample losses taken one after the other (the second
    sample's ascent starts from the duals the first left), and leaves the same duals."""
    images = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(4))
    batched, one_by_one = _small_ot(periodic=periodic), _small_ot(periodic=periodic)
    value = batched.loss(images)
    first, second = one_by_one.loss(images[:1]), one_by_one.loss(images[1:])
    assert float(value) == pytest.approx(0.5 * float(first + second), rel=1e-6)
    assert float(first) != pytest.approx(float(second), rel=1e-3)
    for a, b in zip(batched.psi + batched.psi_avg, one_by_one.psi + one_by_one.psi_avg):
        assert torch.equal(a, b) and float(a.abs().max()) > 0
    # the value is the image cost at the ascended duals ψ̄ of the last sample
    probe = _small_ot(periodic=periodic)
    probe.loss(images[:1])
    rng = probe.generator.get_state()
    probe.ascend_psi([lv.detach() for lv in gaussian_pyramid(images[1:], 2, periodic)])
    expected = probe.image_loss(gaussian_pyramid(images[1:], 2, periodic))
    probe.generator.set_state(rng)
    assert float(second) == pytest.approx(float(expected), rel=1e-6)


def test_loss_gradient_passes_gradcheck_in_float64():
    """The gradient of ``loss`` (duals and patch draws fixed: ψ is held constant, its envelope) against finite
    differences in float64."""
    ot = _small_ot(torch.float64)
    image = torch.rand(1, 3, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    start = ot.generator.get_state()

    def loss(x: torch.Tensor) -> torch.Tensor:
        ot.generator.set_state(start)
        ot.psi = [torch.zeros_like(p) for p in ot.psi]
        return ot.loss(x)

    assert float(loss(image)) > 0
    assert torch.autograd.gradcheck(loss, (image.requires_grad_(True),), eps=1e-7, atol=1e-6)


def test_finish_lowers_the_semidual_cost_and_is_deterministic():
    ex = _exemplar()
    start = torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(2))
    runs = [semidual_finish(start, ex, n_iter=30, lr=0.03, n_scales=2, n_targets=256, psi_steps=4,
                            image_patches=512, generator=torch.Generator().manual_seed(0)) for _ in range(2)]
    result = runs[0]
    assert result.image.shape == (3, 40, 40) and float(result.image.min()) >= 0 and float(result.image.max()) <= 1
    assert torch.equal(runs[0].image, runs[1].image)
    assert result.losses.shape == (30, 2)
    zero = [torch.zeros_like(p) for p in result.ot.psi]
    # nearest-target distance (ψ = 0) and the cost at the final ψ both fall by a stated factor
    assert float(semidual_cost(result.ot, result.image, zero).sum()) < 0.5 * float(
        semidual_cost(result.ot, start, zero).sum())
    assert float(semidual_cost(result.ot, result.image).sum()) < 0.5 * float(semidual_cost(result.ot, start).sum())
    other = semidual_finish(start, ex, n_iter=30, lr=0.03, n_scales=2, n_targets=256, psi_steps=4,
                            image_patches=512, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(other.image, result.image)


def test_finish_keeps_grey_and_supports_periodic_and_patch_per_scale():
    grey = _exemplar()[:1].repeat(3, 1, 1)
    start = torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(3)).repeat(3, 1, 1)
    out = semidual_finish(start, grey, n_iter=3, n_scales=2, patch=[4, 6], n_targets=128, psi_steps=2,
                          image_patches=256, periodic=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.image[0], out.image[1]) and torch.equal(out.image[1], out.image[2])
    assert out.ot.targets[1].shape[1] == 3 * 36
    with pytest.raises(ValueError, match="one per scale"):
        SemiDualPatchOT(grey, n_scales=2, patch=[4])
    with pytest.raises(ValueError, match="n_iter"):
        semidual_finish(start, grey, n_iter=0)


@pytest.mark.parametrize("periodic", [False, True])
def test_finish_colour_gradient_is_scaled_by_patch_coverage(periodic, monkeypatch):
    """The colour term reaches each pixel scaled by the share of 4×4 patches that hold it (a corner: 1/16), so it
    does not outweigh the patch term at the borders; periodic: unscaled. A linear stand-in colour loss
    ``Σ y·probe`` and an Adam that records the pixels' gradient: the gradient with the term minus without it is
    ``λ · coverage · probe``."""
    import imgmw.texture_semidual as semidual
    from imgmw.patches import patch_coverage

    probe = torch.rand(1, 3, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    grads = []

    class Linear:
        def __init__(self, exemplar):
            pass

        def __call__(self, y):
            return (y * probe).sum()

    class Recording(torch.optim.Adam):
        def step(self, closure=None):
            grads.append(self.param_groups[0]["params"][0].grad.clone())
            return super().step(closure)

    monkeypatch.setattr(semidual, "SlicedColourLoss", Linear)
    monkeypatch.setattr(torch.optim, "Adam", Recording)
    ex, start = _exemplar(24).double(), torch.rand(3, 24, 24, dtype=torch.float64,
                                                   generator=torch.Generator().manual_seed(8))
    for weight in (0.0, 3.0):
        semidual_finish(start, ex, n_iter=1, n_scales=2, n_targets=64, psi_steps=1, image_patches=128,
                        periodic=periodic, colour_weight=weight, generator=torch.Generator().manual_seed(0))
    cover = patch_coverage(24, 24, 4, periodic, dtype=torch.float64)
    assert torch.allclose(grads[1] - grads[0], 3.0 * cover * probe, atol=1e-10)
    assert float(cover[0, 0]) == (1.0 if periodic else 1 / 16)


def test_synthesize_texture_finish_flag():
    ex = _exemplar()
    kw = dict(n_iter=8, n_components=2, n_patches=256, diagnose=False, refine_n_iter=0)
    off = synthesize_texture(ex, (32, 32), finish_n_iter=0, generator=torch.Generator().manual_seed(0), **kw)
    on = synthesize_texture(ex, (32, 32), finish_n_iter=5, generator=torch.Generator().manual_seed(0), **kw)
    again = synthesize_texture(ex, (32, 32), finish_n_iter=5, generator=torch.Generator().manual_seed(0), **kw)
    assert not off.finished and off.finish_losses is None and torch.equal(off.image, off.unrefined)
    assert on.finished and on.finish_losses is not None and on.finish_losses.shape[0] == 5
    assert on.unrefined is not None and torch.equal(on.unrefined, off.image)  # the MW2 stage is untouched
    assert not torch.equal(on.image, off.image)
    assert torch.equal(on.image, again.image)
    steps: list[int] = []
    synthesize_texture(ex, (32, 32), finish_n_iter=3, generator=torch.Generator().manual_seed(0),
                       callback=lambda step, per_scale, image: steps.append(step), **kw)
    assert steps == list(range(11))  # the finish's steps count on after the MW2 flow's
    with pytest.raises(ValueError, match="finish_n_iter"):
        synthesize_texture(ex, (32, 32), finish_n_iter=-1, **kw)
    for bad in (-0.5, float("nan"), "30"):
        with pytest.raises(ValueError, match="finish_colour_weight"):
            synthesize_texture(ex, (32, 32), finish_n_iter=3, finish_colour_weight=bad, **kw)


@pytest.mark.parametrize("pixels", [None, 500])
def test_finish_colour_term_restores_rare_bright_colours(pixels, monkeypatch):
    if pixels is not None:  # a random subset of the 1600 pixels per step, as in large images
        monkeypatch.setattr("imgmw.texture_semidual.COLOUR_PIXELS", pixels)
    # an exemplar of dark noise with 3 % bright pixels; the start is the dark noise alone (what a wash-out leaves)
    g = torch.Generator().manual_seed(4)
    ex = 0.1 + 0.05 * torch.rand(3, 48, 48, generator=g)
    bright = torch.rand(48, 48, generator=g) < 0.03
    ex[:, bright] = torch.tensor([0.95, 0.8, 0.5])[:, None]
    start = 0.1 + 0.05 * torch.rand(3, 40, 40, generator=g)
    colour = SlicedColourLoss(ex, n_directions=64, seed=1)  # other directions than the finish's term
    kw = dict(n_iter=40, lr=0.03, n_scales=1, n_targets=256, psi_steps=2, image_patches=512)
    plain = semidual_finish(start, ex, generator=torch.Generator().manual_seed(0), **kw)
    zero = semidual_finish(start, ex, colour_weight=0.0, generator=torch.Generator().manual_seed(0), **kw)
    tinted = semidual_finish(start, ex, colour_weight=30.0, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(plain.image, zero.image)  # weight 0 is the plain finish
    before, without, with_term = (float(colour(img[None])) for img in (start, plain.image, tinted.image))
    assert with_term < 0.5 * without and with_term < 0.5 * before
    # the bright share of the pixels moves towards the exemplar's 3 % (measured inside the 3-pixel border band, where
    # the term acts at full strength: see test_finish_colour_gradient_is_scaled_by_patch_coverage)
    share = [float((img[:, 3:-3, 3:-3].mean(0) > 0.5).float().mean()) for img in (plain.image, tinted.image)]
    assert share[1] > share[0] + (0.01 if pixels is None else 0.005)  # a subset moves fewer pixels per step


def test_mix_of_two_exemplars_skips_the_finish():
    a, b = _exemplar(seed=0), _exemplar(seed=1).flip(-1)
    r = synthesize_texture([a, b], (32, 32), mix=[0.5, 0.5], n_iter=3, n_components=2, n_patches=256,
                           diagnose=False, finish_n_iter=5, generator=torch.Generator().manual_seed(0))
    assert not r.finished


def test_benchmark_baseline_is_the_library_class():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_texture
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert bench_texture.SemiDualPatchOT is SemiDualPatchOT and bench_texture.SCALES == 4



@pytest.mark.parametrize("kwargs, match", [({"lr": 0.0}, "lr"), ({"lr": float("nan")}, "lr"),
                                           ({"schedule": "cosine"}, "schedule"), ({"psi_warmup": True}, "psi_warmup"),
                                           ({"psi_warmup": -1}, "psi_warmup"),
                                           ({"colour_weight": -1.0}, "colour_weight"),
                                           ({"colour_weight": float("inf")}, "colour_weight"),
                                           ({"colour_weight": True}, "colour_weight")])
def test_finish_rejects_bad_settings_before_any_work(monkeypatch, kwargs, match):
    import imgmw.texture_semidual as semidual

    def no_work(*args, **kw):
        raise AssertionError("the targets were drawn before the settings were checked")

    monkeypatch.setattr(semidual, "SemiDualPatchOT", no_work)
    ex = _exemplar(24)
    with pytest.raises(ValueError, match=match):
        semidual_finish(ex.clone(), ex, n_iter=2, **kwargs)
