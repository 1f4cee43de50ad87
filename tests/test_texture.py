"""Tests of imgmw.texture: the Gaussian-random-field start, the target fits, PatchMW2Loss and the re-seeding.

References are independent of the code under test: direct-sum circular convolutions (no FFT) for the
random field, NumPy moments of the exemplar, naive loops for the scale rule, ``extract_patches`` for the
patch means, NumPy eigenvectors for the split, and ``torch.autograd.gradcheck`` in float64.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imgmw.metrics import seam_energy
from imgmw.patches import extract_patches, gaussian_pyramid
from imgmw.texture import (PatchMW2Loss, fit_patch_gmms, gaussian_random_field, synthesize_texture,
                           texture_n_scales)


def _smooth_exemplar(h: int, w: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """A smooth colour texture ``[3, h, w]`` in [0, 1] with correlated channels (blurred mixed noise)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 3, h, w, generator=g, dtype=torch.float64)
    kernel = torch.ones(3, 1, 5, 5, dtype=torch.float64) / 25
    smooth = F.conv2d(F.pad(noise, (2, 2, 2, 2), mode="circular"), kernel, groups=3)[0]
    mixing = torch.tensor([[1.0, 0.2, 0.0], [0.6, 0.8, 0.1], [0.3, 0.3, 0.5]], dtype=torch.float64)
    img = torch.einsum("ij,jhw->ihw", mixing, smooth) * 0.25 + torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)
    return img.clamp(0, 1).to(dtype)


def _colour_moments(img: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """NumPy mean ``[3]`` and (1/N) covariance ``[3, 3]`` of the pixel colours of ``[3, H, W]``."""
    x = img.detach().double().reshape(3, -1).numpy()
    return x.mean(1), np.cov(x, bias=True)


# ------------------------------------------------------------------------------------------ random field

def _direct_field(exemplar: torch.Tensor, size: tuple[int, int], periodic: bool, seed: int) -> torch.Tensor:
    """ADSN by direct summation ``m + Σ_y t(y) W(x − y)`` with the noise the function draws (same seed)."""
    u = exemplar.double()
    h, w = u.shape[-2:]
    height, width = size
    mean = u.mean((-2, -1), keepdim=True)
    spot = (u - mean) / np.sqrt(h * w)
    canvas = (height, width) if periodic else (height + h - 1, width + w - 1)
    noise = torch.randn(canvas, generator=torch.Generator().manual_seed(seed), dtype=exemplar.dtype).double()
    field = torch.zeros(3, *canvas, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            field += spot[:, i, j, None, None] * torch.roll(noise, shifts=(i, j), dims=(0, 1))
    if not periodic:
        field = field[:, h - 1:h - 1 + height, w - 1:w - 1 + width]
    return field + mean


@pytest.mark.parametrize("periodic, size", [(False, (7, 9)), (False, (12, 5)), (False, (3, 2)),
                                           (True, (7, 9)), (True, (12, 5))])
def test_grf_equals_direct_convolution(periodic, size):
    ex = _smooth_exemplar(5, 4, seed=1, dtype=torch.float64)
    got = gaussian_random_field(ex, size, periodic=periodic, generator=torch.Generator().manual_seed(3))
    assert got.shape == (3, *size) and got.dtype == torch.float64
    torch.testing.assert_close(got, _direct_field(ex, size, periodic, 3), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("periodic, ex_size, out_size", [(False, (16, 16), (96, 96)), (True, (16, 16), (96, 96)),
                                                         (True, (48, 40), (24, 20))])
def test_grf_reproduces_exemplar_mean_and_covariance(periodic, ex_size, out_size):
    """E f = m and Cov f(x) = C_u (also when a periodic output is smaller than the exemplar, where the spot
    is cropped and colour-corrected); checked on the pixel moments pooled over 24 independent fields."""
    ex = _smooth_exemplar(*ex_size, seed=2)
    m_ref, c_ref = _colour_moments(ex)
    g = torch.Generator().manual_seed(0)
    fields = torch.stack([gaussian_random_field(ex, out_size, periodic=periodic, generator=g) for _ in range(24)])
    x = fields.double().permute(1, 0, 2, 3).reshape(3, -1).numpy()
    centred = x - m_ref[:, None]
    cov_known_mean = centred @ centred.T / x.shape[1]
    scale = np.sqrt(np.trace(c_ref))
    assert np.abs(x.mean(1) - m_ref).max() < 0.1 * scale
    # measured errors are <= 0.015; without the crop's colour correction the last case gives 0.054
    assert np.linalg.norm(cov_known_mean - c_ref) < 0.04 * np.linalg.norm(c_ref)


def test_grf_periodic_tiles_and_plain_does_not():
    ex = _smooth_exemplar(12, 12, seed=4)
    g = torch.Generator().manual_seed(5)
    periodic = gaussian_random_field(ex, (64, 80), periodic=True, generator=g)
    plain = gaussian_random_field(ex, (64, 80), periodic=False, generator=g)
    assert 0.7 < seam_energy(periodic)["ratio"] < 1.4
    assert seam_energy(plain)["ratio"] > 2.5


def test_grf_is_deterministic_and_seed_dependent():
    ex = _smooth_exemplar(10, 14)
    a = gaussian_random_field(ex, (20, 30), generator=torch.Generator().manual_seed(7))
    b = gaussian_random_field(ex, (20, 30), generator=torch.Generator().manual_seed(7))
    c = gaussian_random_field(ex, (20, 30), generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_grf_grey_exemplar_cropped_stays_grey_and_finite():
    """A grey exemplar has a rank-1 colour covariance: the crop's colour correction uses a pseudo-inverse."""
    grey = _smooth_exemplar(40, 40)[:1].expand(3, -1, -1)
    out = gaussian_random_field(grey, (16, 16), periodic=True, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], out[1])
    torch.testing.assert_close(out[0], out[2])


@pytest.mark.parametrize("bad, match", [((0, 5), "size"), ((5,), "size"), ((4.0, 5), "size")])
def test_grf_bad_size(bad, match):
    with pytest.raises(ValueError, match=match):
        gaussian_random_field(_smooth_exemplar(8, 8), bad)


def test_grf_bad_exemplar():
    with pytest.raises(ValueError, match="exemplar"):
        gaussian_random_field(torch.rand(4, 8, 8), (8, 8))


# ------------------------------------------------------------------------------------------- scale rule

def _naive_scales(hw: tuple[int, int], out: tuple[int, int], min_side: int) -> int:
    s = 1
    while min(*hw, *out) // 2 ** s >= min_side:
        s += 1
    return s


@pytest.mark.parametrize("hw, out, patch", [((128, 128), (256, 256), 4), ((64, 80), (48, 48), 4),
                                            ((256, 200), (640, 360), 8), ((20, 20), (20, 30), 4)])
def test_texture_n_scales_rule(hw, out, patch):
    assert texture_n_scales(hw, out, patch) == _naive_scales(hw, out, max(16, patch))


def test_texture_n_scales_too_small():
    with pytest.raises(ValueError, match="too small"):
        texture_n_scales((3, 10), (32, 32), 4)
    with pytest.raises(ValueError, match="too small"):
        texture_n_scales((64, 64), (32, 32), 4, n_scales=5)     # coarsest output level 2 px < 4


# ------------------------------------------------------------------------------------------ target fits

def test_target_mixture_mean_is_the_patch_mean():
    """With learned weights every EM iterate's mixture mean Σ w_k m_k is the data mean exactly: here the
    mean of all the exemplar's patches at each level (all are used: fewer than n_patches)."""
    ex = _smooth_exemplar(24, 20)
    gmms = fit_patch_gmms(ex, 3, 3, 2, generator=torch.Generator().manual_seed(0))
    levels = gaussian_pyramid(ex[None], 2)
    assert len(gmms) == 2
    for gmm, level in zip(gmms, levels):
        assert gmm.means.shape == (3, 27) and gmm.covariances.shape == (3, 27, 27)
        torch.testing.assert_close(gmm.weights.sum(), torch.tensor(1.0))
        mixture_mean = (gmm.weights[:, None] * gmm.means).sum(0)
        torch.testing.assert_close(mixture_mean, extract_patches(level, 3)[0].mean(0), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- the loss

def test_loss_gradient_reaches_the_image():
    ex = _smooth_exemplar(40, 40)
    loss_fn = PatchMW2Loss(ex, patch=4, n_components=3, n_scales=2, n_patches=512,
                           generator=torch.Generator().manual_seed(0))
    x = gaussian_random_field(ex, (32, 36), generator=torch.Generator().manual_seed(1)).clamp(0, 1)
    x = x[None].requires_grad_(True)
    loss = loss_fn(x)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert loss_fn.last_per_scale.shape == (2,)
    torch.testing.assert_close(loss_fn.last_per_scale.sum(), loss.detach())
    assert torch.isfinite(x.grad).all()
    assert (x.grad.abs() > 0).float().mean() > 0.9          # nearly every pixel lies in a drawn patch


def test_loss_gradcheck_float64():
    """The whole path (pyramid, gather, one EM step, MW2) against finite differences, with the warm-start
    state and the patch positions held fixed so that the function is deterministic."""
    ex = _smooth_exemplar(20, 20, dtype=torch.float64)
    loss_fn = PatchMW2Loss(ex, patch=2, n_components=2, n_scales=2, n_patches=10_000, policy=None,
                           generator=torch.Generator().manual_seed(0))
    x = _smooth_exemplar(12, 12, seed=9, dtype=torch.float64)[None].requires_grad_(True)
    loss_fn(x)                                                  # initialise the warm starts and positions
    states = [loss.em.state for loss in loss_fn.scales]

    def f(img):
        for loss, state in zip(loss_fn.scales, states):
            loss.em.state = state
        return loss_fn(img, resample=False)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("name", ["smooth", "stripes"])
def test_exemplar_scores_far_below_noise(name):
    ex = _smooth_exemplar(48, 48) if name == "smooth" else _stripes(48, 48)
    g = torch.Generator().manual_seed(0)
    loss_fn = PatchMW2Loss(ex, patch=4, n_components=4, n_scales=2, generator=g)
    noise = gaussian_random_field(ex, (48, 48), generator=g).clamp(0, 1)[None]

    def settled(img):
        loss_fn.reset()
        with torch.no_grad():
            return [float(loss_fn(img)) for _ in range(4)][-1]

    assert settled(ex[None]) < settled(noise) / 4


def _stripes(h: int, w: int) -> torch.Tensor:
    """Diagonal two-colour stripes with a sharp profile (a structured, non-Gaussian texture)."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    band = (((xx + yy) % 8) < 3).float()
    colours = torch.tensor([[0.8, 0.3, 0.1], [0.2, 0.3, 0.6]])
    return (band[None] * colours[0].view(3, 1, 1) + (1 - band[None]) * colours[1].view(3, 1, 1)).contiguous()


def test_loss_rejects_too_small_image_and_bad_args():
    ex = _smooth_exemplar(40, 40)
    loss_fn = PatchMW2Loss(ex, patch=4, n_components=2, n_scales=2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="too small"):
        loss_fn(torch.rand(1, 3, 6, 40))
    with pytest.raises(ValueError, match="image"):
        loss_fn(torch.rand(3, 40, 40))
    with pytest.raises(ValueError, match="n_patches"):
        PatchMW2Loss(ex, n_patches=0)


def test_periodic_loss_draws_wrapping_patches():
    """In periodic mode the grid has H·W positions (patches cross the borders): all are used when
    n_patches exceeds it, and the border pixels receive gradient like interior ones."""
    ex = _smooth_exemplar(32, 32)
    loss_fn = PatchMW2Loss(ex, patch=4, n_components=2, n_scales=1, n_patches=10_000, periodic=True,
                           generator=torch.Generator().manual_seed(0))
    x = gaussian_random_field(ex, (20, 24), periodic=True, generator=torch.Generator().manual_seed(1))
    x = x[None].requires_grad_(True)
    loss_fn(x).backward()
    assert loss_fn._positions[0].numel() == 20 * 24
    assert (x.grad[..., 0, :].abs().sum(0) > 0).all() and (x.grad[..., :, -1].abs().sum(0) > 0).all()


# --------------------------------------------------------------------------------------------- synthesis

def test_synthesis_is_deterministic_and_in_range():
    ex = _stripes(40, 40)
    run = lambda: synthesize_texture(ex, (24, 28), n_components=2, n_scales=1, n_iter=3,  # noqa: E731
                                     generator=torch.Generator().manual_seed(3))
    a, b = run(), run()
    assert a.image.shape == (3, 24, 28) and a.losses.shape == (3, 1)
    assert torch.equal(a.image, b.image)
    assert a.image.min() >= 0 and a.image.max() <= 1


def test_synthesis_rejects_bad_arguments():
    ex = _stripes(40, 40)
    with pytest.raises(ValueError, match="optimizer"):
        synthesize_texture(ex, (24, 24), optimizer="sgd")
    with pytest.raises(ValueError, match="lr"):
        synthesize_texture(ex, (24, 24), lr=-1.0)
    with pytest.raises(ValueError, match="too small"):
        synthesize_texture(ex, (2, 24))


def test_grey_exemplar_gives_a_grey_synthesis():
    grey = _stripes(40, 40)[:1].expand(3, -1, -1)
    out = synthesize_texture(grey, (24, 24), n_components=2, n_scales=1, n_iter=3,
                             generator=torch.Generator().manual_seed(0))
    assert out.image.shape == (3, 24, 24)
    assert torch.equal(out.image[0], out.image[1]) and torch.equal(out.image[1], out.image[2])
    colour = synthesize_texture(_stripes(40, 40), (24, 24), n_components=2, n_scales=1, n_iter=3,
                                generator=torch.Generator().manual_seed(0))
    assert not torch.equal(colour.image[0], colour.image[1])


def test_mix_weights_one_zero_reproduce_the_first_exemplars_targets():
    from imgmw.image import load_image
    from imgmw.texture import PatchMW2Loss

    root = Path(__file__).resolve().parents[1] / "data"
    a = load_image(root / "stripes.png")[:, :64, :64].double()
    b = load_image(root / "veins.png")[:, :64, :64].double()
    single = PatchMW2Loss(a, n_scales=2, generator=torch.Generator().manual_seed(0))
    mixed = PatchMW2Loss([a, b], n_scales=2, mix=[1.0, 0.0], generator=torch.Generator().manual_seed(0))
    for s, m in zip(single.targets, mixed.targets):
        torch.testing.assert_close(m.weights, s.weights)
        torch.testing.assert_close(m.means, s.means, atol=1e-7, rtol=0)
        torch.testing.assert_close(m.covariances, s.covariances, atol=1e-7, rtol=1e-6)
    half = PatchMW2Loss([a, b], n_scales=2, mix=[1.0, 1.0], generator=torch.Generator().manual_seed(0))
    assert half.mix == [0.5, 0.5]
    assert not torch.allclose(half.targets[0].means, single.targets[0].means)
    with pytest.raises(ValueError, match="mix must be 2"):
        PatchMW2Loss([a, b], n_scales=2, mix=[1.0])


def test_mixed_synthesis_is_deterministic_for_a_seed():
    from imgmw.image import load_image

    root = Path(__file__).resolve().parents[1] / "data"
    a, b = load_image(root / "stripes.png")[:, :48, :48], load_image(root / "bricks.png")[:, :48, :48]
    runs = [synthesize_texture([a, b], (32, 32), mix=[0.3, 0.7], n_iter=5, n_scales=1,
                               generator=torch.Generator().manual_seed(4)).image for _ in range(2)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


def test_coarse_to_fine_stages_run_every_size_and_count_steps_on():
    from imgmw.image import load_image

    ex = load_image(Path(__file__).resolve().parents[1] / "data" / "bricks.png")[:, :64, :64]
    steps, shapes = [], []
    result = synthesize_texture(ex, (32, 48), stages=2, n_iter=3, n_scales=1, diagnose=False, finish_n_iter=2,
                                generator=torch.Generator().manual_seed(0),
                                callback=lambda step, _, image: (steps.append(step), shapes.append(image.shape)))
    assert result.image.shape == (3, 32, 48) and result.init.shape == (3, 32, 48)
    assert steps == list(range(5))                  # 3 MW2 steps in all: 1 coarse, 2 fine; then 2 finish steps
    assert shapes[0][-2:] == (16, 24) and shapes[-1][-2:] == (32, 48)
    tiled = synthesize_texture(ex, (32, 32), stages=2, n_iter=2, n_scales=1, periodic=True, diagnose=False,
                               generator=torch.Generator().manual_seed(0))
    assert tiled.image.shape == (3, 32, 32)
    with pytest.raises(ValueError, match="stages"):
        synthesize_texture(ex, (32, 32), stages=0, n_iter=2)


def test_check_patch_counts_names_parameters_or_flags():
    from imgmw.texture import check_patch_counts

    with pytest.raises(ValueError, match="n_patches 2 is below n_components 4"):
        check_patch_counts((64, 64), (64, 64), 4, 2, 4, 2)
    with pytest.raises(ValueError, match=r"--k 50 is more than the 25 positions .* output's 8x8 level"):
        check_patch_counts((64, 64), (32, 32), 4, 3, 50, 100, names={"n_components": "--k"})
    check_patch_counts((64, 64), (32, 32), 4, 3, 25, 100)                   # exactly enough: no error


def test_patch_projection_is_optional_gated_and_deterministic(monkeypatch):
    """The projection (imgmw.texture_refine) runs after the same MW2 flow; without the semi-dual finish it is kept
    only when it does not raise the 4×4 patch sliced-W2 (REFINE_KEEP), with it it is always the finish's start; it
    is deterministic for a seed and skipped for real mixes."""
    import imgmw.texture as texture
    from imgmw.image import load_image
    from imgmw.metrics import patch_sliced_w2

    ex = load_image(Path(__file__).resolve().parents[1] / "data" / "bricks.png")[:, :64, :64]
    run = lambda **kw: synthesize_texture(ex, (40, 40), n_scales=1, n_iter=4, diagnose=False,  # noqa: E731
                                          generator=torch.Generator().manual_seed(0), **({"finish_n_iter": 0} | kw))
    off = run(refine_n_iter=0)
    assert not off.refined and off.unrefined is off.image and off.refine_seconds == 0
    monkeypatch.setattr(texture, "REFINE_KEEP", 1e9)             # always kept
    kept = run()
    assert kept.refined and torch.equal(kept.unrefined, off.image) and not torch.equal(kept.image, off.image)
    assert torch.equal(run().image, kept.image) and kept.refine_seconds > 0
    monkeypatch.setattr(texture, "REFINE_KEEP", 0.0)             # never kept
    rejected = run()
    assert not rejected.refined and torch.equal(rejected.image, off.image)
    monkeypatch.setattr(texture, "REFINE_KEEP", 1.0)             # the default rule
    default = run()
    assert default.refined == (patch_sliced_w2(kept.image, ex) <= patch_sliced_w2(off.image, ex))
    mixed = synthesize_texture([ex, ex.flip(-1)], (40, 40), mix=[0.5, 0.5], n_scales=1, n_iter=2, diagnose=False,
                               generator=torch.Generator().manual_seed(0))
    assert not mixed.refined
    with pytest.raises(ValueError, match="refine_n_iter"):
        run(refine_n_iter=-1)
    monkeypatch.setattr(texture, "REFINE_KEEP", 0.0)             # a finish always starts from the projection
    finished = run(finish_n_iter=2)
    assert finished.refined and finished.finished and torch.equal(finished.unrefined, off.image)
    assert not torch.equal(finished.image, kept.image)


def test_texture_scores_report_every_image_given():
    from imgmw.texture import texture_scores

    ex = _stripes(40, 40)
    scores = texture_scores(ex, ex, init=torch.full_like(ex, 0.5), unrefined=ex.flip(-1))
    assert set(scores) == {"patch_sliced_w2", "structure_distance", "near_copy_fraction"}
    assert scores["structure_distance"]["result"] == 0.0 and scores["near_copy_fraction"]["result"] == 1.0
    assert scores["structure_distance"]["init"] > 0 and "mw2_only" in scores["patch_sliced_w2"]


def test_despeckle_replaces_only_the_counted_pixels_after_the_finish(monkeypatch):
    """``despeckle`` runs after the finish only; it changes exactly ``result.speckles`` pixels of the finished
    image (the same run without it), each to a colour of the exemplar."""
    import imgmw.texture as texture
    from imgmw.image import load_image

    ex = load_image(Path(__file__).resolve().parents[1] / "data" / "stripes.png")[:, :64, :64]
    run = lambda **kw: synthesize_texture(ex, (48, 48), n_scales=2, n_iter=20, diagnose=False,  # noqa: E731
                                          generator=torch.Generator().manual_seed(0), finish_n_iter=20, **kw)
    # a short finish with a heavy colour term leaves a grain of off-colour pixels on the flat bands
    monkeypatch.setattr(texture, "FINISH_LR", 0.05)
    plain, cleaned = run(despeckle=False, finish_colour_weight=400.0), run(finish_colour_weight=400.0)
    assert plain.speckles == 0 and cleaned.speckles > 0
    changed = (plain.image != cleaned.image).any(0)
    assert int(changed.sum()) <= cleaned.speckles
    colours = ex.reshape(3, -1).T
    new = cleaned.image[:, changed].T
    assert bool((torch.cdist(new.double(), colours.double()).min(1).values < 1e-6).all())
    unfinished = synthesize_texture(ex, (48, 48), n_scales=2, n_iter=5, diagnose=False, finish_n_iter=0,
                                    generator=torch.Generator().manual_seed(0))
    assert unfinished.speckles == 0 and not unfinished.finished
