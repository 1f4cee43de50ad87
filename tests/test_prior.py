"""Patch priors of image folders (imgmw.prior) and their use as texture targets (apps.texture_synth --prior)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from apps import texture_synth
from apps._cli import run
from imgmw.checkpoint import save_atomic
from imgmw.prior import (collect_patches, component_picture, fit_prior, held_out_log_likelihood, image_generator,
                         list_images, prior_from_dict, prior_to_dict, sample_image_patches)
from imgmw.texture import PatchMW2Loss

ROOT = Path(__file__).resolve().parent.parent


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.open(ROOT / "data" / "wood.png").resize((64, 48)).save(folder / "a.png")
    Image.open(ROOT / "data" / "brick.png").resize((40, 40)).save(folder / "sub" / "b.jpg")
    Image.new("RGB", (6, 6)).save(folder / "tiny.png")  # too small for 2 scales of 4x4 patches: skipped
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_listing_and_patch_draws_depend_on_seed_and_index_only(tmp_path):
    paths = list_images(_folder(tmp_path))
    assert [p.name for p in paths] == ["a.png", "b.jpg", "tiny.png"]  # sorted by path, recursive, images only
    full = collect_patches(paths, range(3), patch=4, n_scales=2, n_train=30, n_held=5, seed=7)
    assert full.train.shape == (2, 60, 48) and full.held.shape == (2, 10, 48)
    assert [p.name for p in full.skipped] == ["tiny.png"]
    second = collect_patches(paths, [1], patch=4, n_scales=2, n_train=30, n_held=5, seed=7)
    assert torch.equal(second.train, full.train[:, 30:])  # image 1's patches whatever else is read
    other_seed = collect_patches(paths, [1], patch=4, n_scales=2, n_train=30, n_held=5, seed=8)
    assert not torch.equal(other_seed.train, second.train)


def test_sample_image_patches_are_patches_of_the_image():
    img = torch.rand(3, 20, 24, generator=torch.Generator().manual_seed(0))
    train, held = sample_image_patches(img, 4, 1, 10, 3, image_generator(0, 0))
    windows = img.unfold(1, 4, 1).unfold(2, 4, 1).permute(1, 2, 0, 3, 4).reshape(-1, 48)
    for row in torch.cat([train[0], held[0]]):
        assert bool((windows == row).all(1).any())
    assert len({tuple(r.tolist()) for r in torch.cat([train[0], held[0]])}) == 13  # distinct positions


def test_fit_scores_pictures_and_round_trips(tmp_path):
    paths = list_images(_folder(tmp_path))
    patches = collect_patches(paths, range(3), patch=4, n_scales=2, n_train=200, n_held=40, seed=0)
    fit = fit_prior(patches.train, 3, n_iter=30, generator=torch.Generator().manual_seed(0))
    assert fit.gmm.batch_shape == (2,) and fit.gmm.n_features == 48
    held = held_out_log_likelihood(fit.gmm, patches.held)
    torch.testing.assert_close(held, fit.gmm.log_prob(patches.held).double().mean(-1))
    picture = component_picture(fit.gmm, 4)
    assert picture.shape[0] == 3 and float(picture.min()) >= 0 and float(picture.max()) <= 1
    path = save_atomic(prior_to_dict(fit.gmm, patch=4, scales=2), tmp_path / "prior.pt")
    back = prior_from_dict(torch.load(path, weights_only=True))
    torch.testing.assert_close(back.means, fit.gmm.means)
    with pytest.raises(ValueError, match="not a patch prior"):
        prior_from_dict({"means": back.means})


def test_patch_loss_with_given_targets():
    exemplar = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    fitted = PatchMW2Loss(exemplar, patch=3, n_components=2, n_scales=2, generator=torch.Generator().manual_seed(0))
    given = PatchMW2Loss(exemplar, patch=3, targets=fitted.targets)
    assert given.n_scales == 2 and given.n_components == 2
    for a, b in zip(given.targets, fitted.targets):
        torch.testing.assert_close(a.means, b.means)
    assert float(given(exemplar[None])) >= 0
    with pytest.raises(ValueError, match="D="):
        PatchMW2Loss(exemplar, patch=4, targets=fitted.targets)
    with pytest.raises(ValueError, match="n_scales"):
        PatchMW2Loss(exemplar, patch=3, n_scales=3, targets=fitted.targets)


def test_texture_synth_with_a_prior(tmp_path, capsys):
    paths = list_images(_folder(tmp_path))
    patches = collect_patches(paths, range(3), patch=4, n_scales=2, n_train=200, n_held=10, seed=0)
    fit = fit_prior(patches.train, 3, n_iter=20, generator=torch.Generator().manual_seed(0))
    prior = save_atomic(prior_to_dict(fit.gmm, patch=4, scales=2), tmp_path / "prior.pt")
    out = tmp_path / "out"
    argv = [str(ROOT / "data" / "wood.png"), "--prior", str(prior), "--size", "48", "--iters", "4", "--output",
            str(out), "--quiet"]
    assert run("texture_synth", texture_synth.main, argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    settings = metrics["settings"]
    assert settings["k"] == 3 and settings["scales"] == 2 and settings["prior"] == str(prior)
    assert len(metrics["refit_mw2_per_scale"]) == 2
    capsys.readouterr()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    assert run("texture_synth", texture_synth.main, [*argv[:2], str(bad), *argv[3:]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a prior" in err
    assert run("texture_synth", texture_synth.main, [*argv, "--stages", "2"]) == 2


def test_style_transfer_with_a_prior(tmp_path, capsys):
    from apps import style_transfer
    from imgmw.style import PatchFeatures, StyleModel

    paths = list_images(_folder(tmp_path))
    patches = collect_patches(paths, range(3), patch=3, n_scales=2, n_train=150, n_held=10, seed=0)
    fit = fit_prior(patches.train, 2, n_iter=20, generator=torch.Generator().manual_seed(0))
    model = StyleModel.from_patch_prior(fit.gmm, 3)
    features = PatchFeatures(**{k: v for k, v in model.extractor.items() if k != "features"})
    assert model.layers == features.layers and model.dims == features.dims
    prior = save_atomic(prior_to_dict(fit.gmm, patch=3, scales=2), tmp_path / "prior.pt")
    out = tmp_path / "styled"
    argv = [str(ROOT / "data" / "chelsea.jpg"), str(ROOT / "data" / "wood.png"), "--prior", str(prior), "--size", "48",
            "--iters", "3", "--output", str(out), "--quiet"]
    assert run("style_transfer", style_transfer.main, argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["extractor"] == {"features": "patches", "patch": 3, "n_scales": 2}
    assert metrics["layers"] == ["scale0", "scale1"]
    capsys.readouterr()
    assert run("style_transfer", style_transfer.main, [*argv, "--features", "vgg19"]) == 2
    assert "--prior" in capsys.readouterr().err
