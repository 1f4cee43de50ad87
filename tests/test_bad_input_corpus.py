"""The hardening corpus: bad command lines, files and tensors, each expected to end in one clear line (apps:
exit code 2, nothing under --output) or a ValueError/TypeError naming the problem (library)."""
from __future__ import annotations

import importlib

import pytest
import torch
from PIL import Image

from apps._cli import run
from imgmw import GMM, fit_gmm, gmm_ot_map, mw2
from imgmw.colour import transfer_colours
from imgmw.metrics import sliced_w2, structure_distance
from imgmw.texture import synthesize_texture
from tests.app_checks import assert_clean_failure
from tests.test_app_color import ROOT

# (app, argv, fragment the single stderr line must contain). Placeholders: {src}, {tgt} small images,
# {text} a text file, {dir} a directory, {file_dir} a path under a regular file.
APP_CASES = [
    ("color_transfer", ["{tmp}/missing.png", "{tgt}"], "missing.png"),
    ("color_transfer", ["{dir}", "{tgt}"], "is a directory"),
    ("color_transfer", ["{text}", "{tgt}"], "text.png"),
    ("color_transfer", ["{src}", "{tgt}", "--k", "0"], "--k"),
    ("color_transfer", ["{src}", "{tgt}", "--k", "100000"], "--k"),
    ("color_transfer", ["{src}", "{tgt}", "--lr", "-1"], "--lr"),
    ("color_transfer", ["{src}", "{tgt}", "--lr", "nan"], "--lr"),
    ("color_transfer", ["{src}", "{tgt}", "--iters", "0"], "--iters"),
    ("color_transfer", ["{src}", "{tgt}", "--polish-iters", "-1"], "--polish-iters"),
    ("color_transfer", ["{src}", "{tgt}", "--max-colors", "0"], "--max-colors"),
    ("color_transfer", ["{src}", "{tgt}", "--lambdas", "0", "1"], "--lambdas"),
    ("color_transfer", ["{src}", "{tgt}", "--method", "bogus"], "--method"),
    ("color_transfer", ["{src}", "{tgt}", "--colorspace", "xyz"], "--colorspace"),
    ("color_transfer", ["{src}", "{tgt}", "--device", "cuda"], "--device"),
    ("color_transfer", ["{src}", "{tgt}", "--seed", "-1"], "--seed"),
    ("texture_synth", ["{tmp}/missing.png"], "missing.png"),
    ("texture_synth", ["{text}"], "text.png"),
    ("texture_synth", ["{src}", "--size", "0"], "size"),
    ("texture_synth", ["{src}", "--size", "abc"], "size"),
    ("texture_synth", ["{src}", "--size", "10000"], "--size"),
    ("texture_synth", ["{src}", "--patch", "0"], "--patch"),
    ("texture_synth", ["{src}", "--patch", "64"], "--patch"),
    ("texture_synth", ["{src}", "--k", "0"], "--k"),
    ("texture_synth", ["{src}", "--size", "32", "--k", "5000", "--n-patches", "9000"], "--k"),
    ("texture_synth", ["{src}", "--size", "32", "--n-patches", "1"], "--n-patches"),
    ("texture_synth", ["{src}", "--size", "32", "--lr", "1e30"], "--lr"),
    ("texture_synth", ["{src}", "--scales", "0"], "--scales"),
    ("texture_synth", ["{src}", "--size", "32", "--scales", "20"], "scales"),
    ("texture_synth", ["{src}", "--optimizer", "sgd"], "--optimizer"),
    ("texture_synth", ["{src}", "--save-every", "-1"], "--save-every"),
    ("texture_synth", ["{src}", "{tgt}", "--mix", "1"], "--mix"),
    ("texture_synth", ["{src}", "{tgt}", "--mix", "0", "0"], "--mix"),
    ("texture_synth", ["{src}", "{tmp}/missing.png", "--mix", "1", "1"], "missing.png"),
    ("style_transfer", ["{tmp}/missing.png", "{tgt}"], "missing.png"),
    ("style_transfer", ["{src}", "{tmp}/missing.png"], "missing.png"),
    ("style_transfer", ["{src}", "{tgt}", "--lr", "2"], "--lr"),
    ("style_transfer", ["{src}", "{tgt}", "--k", "0"], "--k"),
    ("style_transfer", ["{src}", "{tgt}", "--iters", "0"], "--iters"),
    ("style_transfer", ["{src}", "{tgt}", "--features", "patches", "--weights", "{text}"], "--weights"),
    ("style_transfer", ["{src}", "{tgt}", "--restart-every", "-1"], "--restart-every"),
    ("style_transfer", ["{src}", "{tgt}", "--features", "resnet"], "--features"),
    ("barycenter", ["--mode", "bogus"], "--mode"),
    ("barycenter", ["--k", "0"], "--k"),
    ("barycenter", ["--iters", "0"], "--iters"),
    ("barycenter", ["--mode", "palette", "{tmp}/missing.png", "{tgt}"], "missing.png"),
    ("barycenter", ["--weights", "-1", "2"], "weights"),
    ("train_generator", ["--data", "bogus"], "--data"),
    ("train_generator", ["--lr", "1e3", "--iters", "40"], "lr=1000"),
    ("train_generator", ["--batch", "0"], "--batch"),
    ("train_generator", ["--k", "0"], "--k"),
    ("train_generator", ["--resume"], "--resume"),
    ("train_generator", ["--iters", "0"], "--iters"),
    ("train_generator", ["--data", "patches", "--image", "{tmp}/missing.png"], "missing.png"),
    ("em_operator", ["--k", "0"], "--k"),
    ("em_operator", ["--seed", "99999999999999999999"], "--seed"),
    ("em_operator", ["--lr", "-1"], "--lr"),
    ("em_operator", ["--n-points", "3", "--k", "4"], "--n-points"),
    ("em_operator", ["--resume"], "--resume"),
    ("em_operator", ["--threads", "0"], "--threads"),
    ("fit_prior", ["{tmp}/missing"], "missing"),
    ("fit_prior", ["{src}"], "not a directory"),
    ("fit_prior", ["{dir}"], "no image"),
    ("fit_prior", ["{tmp}", "--k", "2", "--per-image", "20"], "text.png"),
    ("fit_prior", ["--patch", "40"], "--patch"),
    ("fit_prior", ["--tol", "-1"], "--tol"),
    ("fit_prior", ["--k", "0"], "--k"),
    ("em_gradients", ["flow", "--seed", "99999999999999999999"], "--seed"),
    ("em_gradients", ["flow", "--threads", "0"], "--threads"),
    ("em_gradients", ["flow", "--dtype", "float16"], "--dtype"),
    ("em_gradients", ["flow", "--iters", "0"], "--iters"),
    ("em_gradients", ["accuracy", "--draws", "x"], "--draws"),
]
OWN_RUN = {"em_operator", "em_gradients"}  # their main() reports errors itself


@pytest.fixture
def files(tmp_path):
    src, tgt = tmp_path / "src.png", tmp_path / "tgt.png"
    Image.open(ROOT / "data" / "coffee.jpg").resize((48, 32)).save(src)
    Image.open(ROOT / "data" / "rocket.jpg").resize((40, 28)).save(tgt)
    text = tmp_path / "text.png"
    text.write_text("not an image\n")
    (tmp_path / "a_dir").mkdir()
    return {"tmp": str(tmp_path), "src": str(src), "tgt": str(tgt), "text": str(text), "dir": str(tmp_path / "a_dir")}


def _main(name: str):
    module = importlib.import_module(f"apps.{name}")
    return module.main if name in OWN_RUN else (lambda argv: run(name, module.main, argv))


@pytest.mark.parametrize("name, argv, fragment", APP_CASES, ids=[f"{c[0]}:{' '.join(c[1])}" for c in APP_CASES])
def test_a_bad_command_line_is_one_line_exit_2_and_writes_nothing(name, argv, fragment, files, tmp_path, capsys):
    argv = [a.format(**files) for a in argv]
    assert_clean_failure(_main(name), capsys, argv, tmp_path / "out", fragment)


@pytest.mark.parametrize("name, argv", [("color_transfer", ["{src}", "{tgt}"]), ("texture_synth", ["{src}"]),
                                        ("em_operator", []), ("em_gradients", ["flow"]), ("train_generator", []),
                                        ("fit_prior", ["--k", "2", "--per-image", "20", "--held-out", "5"])])
def test_an_output_path_under_a_file_names_output(name, argv, files, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    out = blocker / "sub"
    main = _main(name)
    assert main([a.format(**files) for a in argv] + ["--output", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--output" in err, err
    assert blocker.read_text() == "a file"


def _g(k: int, d: int = 2, dtype=torch.float64) -> GMM:
    return GMM(torch.full((k,), 1.0 / max(k, 1), dtype=dtype), torch.zeros(k, d, dtype=dtype),
               torch.eye(d, dtype=dtype).expand(k, d, d).clone())


LIBRARY_CASES = {
    "fit_gmm: zero components": (lambda: fit_gmm(torch.randn(20, 2), 0), ValueError, "n_components"),
    "fit_gmm: fewer points than components": (lambda: fit_gmm(torch.randn(3, 2), 5), ValueError, "n_components"),
    "fit_gmm: NaN point": (lambda: fit_gmm(torch.tensor([[float("nan"), 0.0]] * 10), 2), ValueError, "NaN"),
    "fit_gmm: 1-D points": (lambda: fit_gmm(torch.randn(20), 2), ValueError, "shape"),
    "fit_gmm: integer points": (lambda: fit_gmm(torch.ones(20, 2, dtype=torch.long), 2), TypeError, "float"),
    "mw2: no component": (lambda: mw2(_g(0), _g(1)), ValueError, "component"),
    "mw2: dimensions differ": (lambda: mw2(_g(2, 2), _g(2, 3)), ValueError, "D"),
    "mw2: negative penalty": (lambda: mw2(_g(2), _g(2), unbalanced=(-1.0, 1.0)), ValueError, "lam"),
    "GMM.log_prob: NaN point": (lambda: _g(2).log_prob(torch.tensor([[float("nan"), 0.0]], dtype=torch.float64)),
                                ValueError, "NaN"),
    "sliced_w2: inf point": (lambda: sliced_w2(torch.tensor([[float("inf"), 0.0]]), torch.zeros(1, 2),
                                               torch.ones(1, 2)), ValueError, "finite"),
    "transfer_colours: NaN image": (lambda: transfer_colours(torch.full((3, 8, 8), float("nan")), torch.rand(3, 8, 8)),
                                    ValueError, "source contains NaN"),
    "transfer_colours: grey image": (lambda: transfer_colours(torch.rand(8, 8), torch.rand(3, 8, 8)), ValueError,
                                     r"\[3, H, W\]"),
    "synthesize_texture: mix of the wrong length": (
        lambda: synthesize_texture([torch.rand(3, 32, 32)] * 2, (32, 32), mix=[1.0], n_iter=1), ValueError, "mix"),
    "structure_distance: result smaller than the patch": (
        lambda: structure_distance(torch.rand(3, 8, 8), torch.rand(3, 32, 32)), ValueError, "smaller"),
    "gmm_ot_map: mis-shaped plan": (lambda: gmm_ot_map(torch.zeros(4, 2, dtype=torch.float64), _g(2), _g(3),
                                                       plan=torch.ones(3, 3, dtype=torch.float64) / 9),
                                    ValueError, "plan"),
    "gmm_ot_map: wrong point dimension": (lambda: gmm_ot_map(torch.zeros(4, 3, dtype=torch.float64), _g(2), _g(2)),
                                          ValueError, r"N, 2\]"),
}


@pytest.mark.parametrize("case", sorted(LIBRARY_CASES))
def test_a_bad_library_call_raises_a_clear_error(case):
    call, error, fragment = LIBRARY_CASES[case]
    with pytest.raises(error, match=fragment):
        call()
