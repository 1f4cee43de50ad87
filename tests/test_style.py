"""Style transfer (imgmw.style and python -m apps.style_transfer): feature extractors against hand-written
references, the offline-only VGG-19 weight loading, the stored style mixtures, and end-to-end app runs."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from apps import style_transfer as app
from apps._cli import run
from tests.app_checks import assert_clean_failure
from imgmw.image import load_image
from imgmw.patches import gaussian_pyramid
from imgmw.style import (VGG19_FILE, PatchFeatures, StyleModel, VGG19Features, WeightsUnavailableError,
                         fit_style_gmms, load_vgg19_state, make_extractor, style_distances, style_transfer,
                         vgg19_cache_path)

ROOT = Path(__file__).resolve().parent.parent
# VGG-19 convolutions up to conv3_1 as (index in torchvision's vgg19().features, out, in), from the paper
# by Simonyan & Zisserman (configuration E): 64, 64, pool, 128, 128, pool, 256, ...
VGG_CONVS = ((0, 64, 3), (2, 64, 64), (5, 128, 64), (7, 128, 128), (10, 256, 128))


def fake_vgg_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random He-scaled weights with the shapes of VGG-19's ``features.*`` up to conv3_1."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for idx, out_ch, in_ch in VGG_CONVS:
        state[f"features.{idx}.weight"] = torch.randn(out_ch, in_ch, 3, 3, generator=g) * (2 / (9 * in_ch)) ** 0.5
        state[f"features.{idx}.bias"] = 0.1 * torch.randn(out_ch, generator=g)
    return state


def reference_vgg_maps(image: torch.Tensor, state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """relu1_1, relu2_1, relu3_1 written out with torch.nn.functional (ImageNet normalisation first)."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def conv(h, i):
        return F.relu(F.conv2d(h, state[f"features.{i}.weight"], state[f"features.{i}.bias"], padding=1))

    r11 = conv((image - mean) / std, 0)
    r21 = conv(F.max_pool2d(conv(r11, 2), 2), 5)
    r31 = conv(F.max_pool2d(conv(r21, 7), 2), 10)
    return [r11, r21, r31]


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    """TORCH_HOME pointing at an empty directory: no cached VGG-19 weights."""
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def _images(tmp_path: Path, size: tuple[int, int] = (48, 32)) -> tuple[Path, Path]:
    content, style = tmp_path / "content.png", tmp_path / "style.jpg"
    Image.open(ROOT / "data" / "chelsea.jpg").resize(size).save(content)
    Image.open(ROOT / "data" / "wood.png").resize((40, 40)).save(style)
    return content, style


def _main(argv: list[str]) -> int:
    return run("style_transfer", app.main, argv)


# ------------------------------------------------------------------------------------------- extractors

def test_patch_features_are_pyramid_patches():
    img = torch.rand(1, 3, 24, 20, generator=torch.Generator().manual_seed(0))
    ex = PatchFeatures(patch=3, n_scales=3)
    feats = ex(img)                                             # all positions
    levels = gaussian_pyramid(img, 3)
    assert ex.dims == (27, 27, 27)
    for pts, level in zip(feats.points, levels):
        assert torch.equal(pts, F.unfold(level, 3).transpose(1, 2))
    assert torch.equal(feats.content, levels[-1])
    sampled = ex(img, 10, torch.Generator().manual_seed(1))
    for pts, full in zip(sampled.points, feats.points):
        assert pts.shape == (1, min(10, full.shape[1]), 27)
        # every sampled row is one of the patches, and rows are distinct positions
        match = (pts[0, :, None, :] == full[0, None, :, :]).all(-1)
        assert match.any(1).all()
        assert len({int(j) for j in match.float().argmax(1)}) == pts.shape[1]


def test_patch_features_too_small_image():
    with pytest.raises(ValueError, match="too small"):
        PatchFeatures(3, 3).check_size(11, 40)
    PatchFeatures(3, 3).check_size(12, 12)


def test_vgg_features_match_functional_reference():
    state = fake_vgg_state()
    ex = VGG19Features(state)
    assert ex.layers == ("relu1_1", "relu2_1", "relu3_1") and ex.dims == (64, 128, 256)
    img = torch.rand(1, 3, 20, 16, generator=torch.Generator().manual_seed(2))
    maps = ex.maps(img)
    for got, want in zip(maps, reference_vgg_maps(img, state)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    feats = ex(img)
    for pts, want in zip(feats.points, maps):
        assert torch.equal(pts, want.flatten(2).transpose(1, 2))
    assert torch.equal(feats.content, maps[-1])
    assert not any(p.requires_grad for p in ex.parameters())


def test_vgg_rejects_wrong_weights():
    state = fake_vgg_state()
    state["features.5.weight"] = state["features.5.weight"][:, :32]
    with pytest.raises(WeightsUnavailableError, match="features.5.weight"):
        VGG19Features(state)
    with pytest.raises(ValueError, match="layers"):
        VGG19Features(fake_vgg_state(), layers=("relu9_9",))


# ---------------------------------------------------------------------------------------- weight loading

def test_vgg_weights_missing_offline_message(empty_torch_home, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("must not download without download=True")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    assert vgg19_cache_path() == empty_torch_home / "hub" / "checkpoints" / VGG19_FILE
    with pytest.raises(WeightsUnavailableError) as err:
        make_extractor("vgg19")
    message = str(err.value)
    assert str(vgg19_cache_path()) in message and "--download" in message and "--weights" in message
    assert make_extractor("auto").name == "patches"
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        load_vgg19_state(empty_torch_home / "nope.pth")


def test_vgg_weights_legacy_checkpoint_format(tmp_path):
    """Checkpoints in the pre-zip format (as old model-zoo files are) cannot be memory-mapped; they still load."""
    state = fake_vgg_state()
    path = tmp_path / "legacy.pth"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    loaded = load_vgg19_state(path)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_vgg_weights_from_cache_and_download(empty_torch_home, monkeypatch):
    state = fake_vgg_state()
    calls = []

    def fake_download(url, **kwargs):
        calls.append(url)
        return dict(state, **{"classifier.0.weight": torch.zeros(2, 2)})

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    ex = make_extractor("vgg19", download=True)
    assert calls and calls[0].endswith(VGG19_FILE) and ex.name == "vgg19"
    cached = vgg19_cache_path()
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    assert make_extractor("auto").name == "vgg19"
    assert len(calls) == 1  # the cached file is used, nothing fetched
    torch.testing.assert_close(make_extractor("vgg19").net[0].weight, state["features.0.weight"])


# -------------------------------------------------------------------------------------------- style model

def test_style_model_round_trip(tmp_path):
    style = torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(3))
    ex = PatchFeatures(3, 2)
    model = fit_style_gmms(ex, style, n_components=2, generator=torch.Generator().manual_seed(0))
    assert model.layers == ex.layers and model.dims == (27, 27)
    for g in model.gmms:
        assert g.n_components == 2 and torch.allclose(g.weights.sum(), torch.tensor(1.0))
    path = model.save(tmp_path / "style_gmm.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["style_gmm.pt"]
    back = StyleModel.load(path)
    assert back.extractor == ex.config() and back.layers == model.layers
    for a, b in zip(back.gmms, model.gmms):
        assert torch.equal(a.weights, b.weights) and torch.equal(a.means, b.means)
        assert torch.equal(a.covariances, b.covariances)
    assert make_extractor(**back.extractor).config() == ex.config()
    bad = tmp_path / "bad.pt"
    torch.save({"something": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a style model"):
        StyleModel.load(bad)


def test_style_transfer_from_stored_model_and_checks():
    g = torch.Generator().manual_seed(0)
    content = torch.rand(3, 24, 24, generator=g)
    style = torch.rand(3, 24, 24, generator=g) * 0.3
    ex = PatchFeatures(3, 2)
    model = fit_style_gmms(ex, style, n_components=2, generator=g)
    res = style_transfer(content, model, features=ex, n_components=2, n_iter=3, n_samples=64, generator=g)
    assert res.image.shape == content.shape and res.style_losses.shape == (3, 2)
    assert res.layer_weights == pytest.approx([1 / 27 ** 2] * 2)
    assert float(res.image.min()) >= 0 and float(res.image.max()) <= 1
    # the total is the λ-weighted sum of the per-layer terms (no content term by default)
    torch.testing.assert_close(res.losses, (res.style_losses / 27 ** 2).sum(1), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="components"):
        style_transfer(content, model, features=ex, n_components=3, n_iter=1)
    with pytest.raises(ValueError, match="do not match"):
        style_transfer(content, model, features=PatchFeatures(3, 3), n_components=2, n_iter=1)
    with pytest.raises(ValueError, match="content_weight"):
        style_transfer(content, model, features=ex, n_components=2, n_iter=1, content_weight=-1.0)
    with pytest.raises(ValueError, match="content"):
        style_transfer(torch.rand(3, 5, 5), model, features=ex, n_components=2, n_iter=1)


def test_content_weight_keeps_the_content():
    g = torch.Generator().manual_seed(0)
    content = torch.rand(3, 32, 32, generator=g)
    style = torch.rand(3, 32, 32, generator=g) ** 4
    ex = PatchFeatures(3, 2)
    model = fit_style_gmms(ex, style, n_components=2, generator=g)
    free = style_transfer(content, model, features=ex, n_components=2, n_iter=20, lr=0.05, n_samples=256,
                          generator=torch.Generator().manual_seed(1))
    held = style_transfer(content, model, features=ex, n_components=2, n_iter=20, lr=0.05, n_samples=256,
                          content_weight=1.0, generator=torch.Generator().manual_seed(1))
    assert float(held.content_losses[-1]) < 0.5 * float(free.content_losses[-1])


# ------------------------------------------------------------------------------------------------ the app

def test_app_patches_end_to_end(tmp_path):
    content, style = _images(tmp_path)
    out = tmp_path / "out"
    assert _main([str(content), str(style), "--features", "patches", "--iters", "30", "--n-samples", "512",
                  "--lr", "0.02", "--output", str(out), "--quiet", "--save-every", "15"]) == 0
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == ["comparison.png", "frame_00015.png", "frame_00030.png", "metrics.json", "style_gmm.pt",
                     "stylised.png"]
    assert Image.open(out / "stylised.png").size == (48, 32)
    m = json.loads((out / "metrics.json").read_text())
    assert m["extractor"] == {"features": "patches", "patch": 3, "n_scales": 3}
    for layer in m["layers"]:
        assert m["style_mw2_result_per_layer"][layer] < 0.3 * m["style_mw2_content_per_layer"][layer]
    assert m["final_total_loss"] < 0.8 * m["first_total_loss"]
    assert m["patch_sw2_result_to_style"] < 0.5 * m["patch_sw2_content_to_style"]
    assert 0 < m["luminance_ssim_result_vs_content"] < 1
    model = StyleModel.load(out / "style_gmm.pt")
    assert model.layers == tuple(m["layers"])
    # the stored mixtures are the ones the metrics were measured against
    dist = style_distances(load_image(out / "stylised.png"), model, make_extractor(**model.extractor))
    assert dist == pytest.approx(list(m["style_mw2_result_per_layer"].values()), rel=0.2, abs=1e-3)


def test_app_vgg19_with_weights_file(tmp_path):
    """The VGG-19 code path end to end with random weights given by --weights (no real weights offline)."""
    content, style = _images(tmp_path, (32, 24))
    weights = tmp_path / "vgg.pth"
    torch.save(fake_vgg_state(), weights)
    out = tmp_path / "vgg"
    assert _main([str(content), str(style), "--weights", str(weights), "--iters", "8", "--n-samples", "128",
                  "--output", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["extractor"]["features"] == "vgg19" and m["dims"] == [64, 128, 256]
    assert m["layer_weights"] == pytest.approx([1 / 64 ** 2, 1 / 128 ** 2, 1 / 256 ** 2])
    assert StyleModel.load(out / "style_gmm.pt").dims == (64, 128, 256)
    # gradients flow through the network: the pixels moved and every loss stayed finite (whether 8 steps on a
    # random-weight network lower the loss depends on the seed, so that is not asserted)
    result = torch.from_numpy(np.asarray(Image.open(out / "stylised.png"), dtype=np.float32) / 255)
    source = torch.from_numpy(np.asarray(Image.open(content).convert("RGB"), dtype=np.float32) / 255)
    assert float((result - source).abs().mean()) > 2e-3
    assert all(math.isfinite(v) for v in m["final_loss_per_layer"].values())


def test_app_vgg19_without_weights_exits_2(tmp_path, empty_torch_home, capsys):
    content, style = _images(tmp_path)
    out = tmp_path / "never"
    assert _main([str(content), str(style), "--features", "vgg19", "--output", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not available offline" in err and "--download" in err, err
    assert not out.exists() and not list(tmp_path.glob(".never-*"))


def test_module_entry_point(tmp_path):
    content, style = _images(tmp_path)
    out = tmp_path / "cli"
    env = dict(os.environ, PYTHONPATH=str(ROOT), TORCH_HOME=str(tmp_path / "th"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "apps.style_transfer", str(content), str(style), "--iters", "10",
                           "--n-samples", "256", "--output", str(out), "--quiet"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout and "patches features" in proc.stdout
    assert {"stylised.png", "comparison.png", "metrics.json", "style_gmm.pt"} <= {p.name for p in out.iterdir()}


def _assert_clean_failure(capsys, argv: list[str], out: Path, fragment: str) -> None:
    assert_clean_failure(_main, capsys, argv, out, fragment)


def test_bad_inputs_exit_2_and_write_nothing(tmp_path, capsys):
    content, style = _images(tmp_path)
    out = tmp_path / "never"
    _assert_clean_failure(capsys, [str(tmp_path / "missing.png"), str(style)], out, "does not exist")
    _assert_clean_failure(capsys, [str(content), str(tmp_path)], out, "directory")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    _assert_clean_failure(capsys, [str(text), str(style)], out, str(text))
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (10, 30), (10, 200, 30)).save(tiny)
    _assert_clean_failure(capsys, [str(tiny), str(style), "--features", "patches"], out, "too small")
    _assert_clean_failure(capsys, [str(content), str(style), "--weights", str(tmp_path / "w.pth")], out,
                          "does not exist")
    _assert_clean_failure(capsys, [str(content), str(style), "--weights", str(text)], out, "cannot read VGG-19")
    _assert_clean_failure(capsys, [str(content), str(style), "--features", "patches", "--weights", str(text)], out,
                          "--weights")
    _assert_clean_failure(capsys, [str(content), str(style), "--restart-every", "-1"], out, "--restart-every")


def test_bad_flags_exit_2(tmp_path, capsys):
    content, style = _images(tmp_path)
    for flags in (["--k", "0"], ["--features", "resnet"], ["--size", "abc"], ["--content-weight", "-1"],
                  ["--lr", "nan"], ["--n-samples", "0"]):
        assert run("app", app.main, [str(content), str(style), *flags]) == 2   # one line, no usage block
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "error" in err, err


def test_help_is_fast_and_lazy():
    code = ("import sys, apps.style_transfer as m\n"
            "assert 'torch' not in sys.modules, sorted(sys.modules)\n"
            "try:\n    m.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "assert 'torch' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    assert "--features" in proc.stdout and "--download" in proc.stdout
