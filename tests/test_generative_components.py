"""The component-coded digits generator (``target="components"``), the truncation trick and their app flags.

References: a closed-form Gaussian W2 through SciPy's ``sqrtm`` for :func:`component_w2_loss`, :func:`imgmw.mw2`
for the bound it is, ``torch.randn`` itself for the untruncated latent.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from apps import generate, train_generator
from apps._cli import run
from imgmw import GMM, mw2
from imgmw.generative import (SLICED_DIRECTIONS, SLICED_WEIGHT, MW2GeneratorTrainer, component_w2_loss,
                              generated_sliced_w2, load_checkpoint, load_samples, make_generator,
                              nearest_train_distance, save_checkpoint, truncated_latent)
from tests.app_checks import assert_resumes_exactly


def _digits_trainer(k: int = 4, z_dim: int = 4, batch: int = 64, seed: int = 0, **kw) -> MW2GeneratorTrainer:
    data = load_samples("digits", seed=0)
    net = make_generator(z_dim + k, 64, 32, seed=seed, output="sigmoid")
    return MW2GeneratorTrainer(net, data.train, z_dim=z_dim, n_components=k, batch=batch, seed=seed,
                               target="components", **kw)


# --------------------------------------------------------------------------------------------- truncation
def test_truncation_one_is_plain_sampling_and_scales_the_noise_only():
    plain = torch.randn(50, 6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(truncated_latent(50, 6, generator=torch.Generator().manual_seed(3)), plain)
    assert torch.equal(truncated_latent(50, 6, 1.0, generator=torch.Generator().manual_seed(3)), plain)
    half = truncated_latent(50, 6, 0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(half, 0.5 * plain)
    coded = truncated_latent(200, 6, 1.0, n_codes=5, generator=torch.Generator().manual_seed(3))
    shrunk = truncated_latent(200, 6, 0.25, n_codes=5, generator=torch.Generator().manual_seed(3))
    assert coded.shape == shrunk.shape == (200, 11)
    assert torch.equal(coded[:, :6], torch.randn(200, 6, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(shrunk[:, :6], 0.25 * coded[:, :6]) and torch.equal(shrunk[:, 6:], coded[:, 6:])  # codes kept
    onehot = coded[:, 6:]
    assert torch.equal(onehot.sum(1), torch.ones(200)) and set(onehot.unique().tolist()) == {0.0, 1.0}
    assert (onehot.sum(0) > 0).all()  # every code drawn
    assert torch.equal(truncated_latent(7, 3, 0.0), torch.zeros(7, 3))


@pytest.mark.parametrize("psi", [-0.1, 1.5, float("nan")])
def test_truncation_outside_unit_interval_is_rejected(psi):
    with pytest.raises(ValueError, match="truncation"):
        truncated_latent(4, 2, psi)


def test_trainer_sample_truncation_limits():
    data = load_samples("gmm2d", n_train=500, n_test=100, seed=0)
    trainer = MW2GeneratorTrainer(make_generator(4, 2, 16, seed=0), data.train, z_dim=4, n_components=4, batch=64,
                                  seed=0)
    assert torch.equal(trainer.sample(30, seed=5, truncation=1.0), trainer.sample(30, seed=5))
    with torch.no_grad():
        plain = trainer.net(torch.randn(30, 4, generator=torch.Generator().manual_seed(5)))
        mean_sample = trainer.net(torch.zeros(1, 4))
    assert torch.equal(trainer.sample(30, seed=5), plain)
    assert torch.allclose(trainer.sample(30, seed=5, truncation=0.0), mean_sample.expand(30, 2))
    near = trainer.sample(30, seed=5, truncation=1e-6)
    assert torch.allclose(near, mean_sample.expand(30, 2), atol=1e-4)  # ψ → 0: the mean latent's sample
    assert not torch.allclose(trainer.sample(30, seed=5, truncation=0.5), plain)

    coded = _digits_trainer(k=3)
    x = coded.sample(60, seed=1, truncation=0.0)
    z = truncated_latent(60, 4, 0.0, n_codes=3, generator=torch.Generator().manual_seed(1))
    codes = z[:, 4:].argmax(1)
    with torch.no_grad():
        per_code = coded.net(torch.cat([torch.zeros(3, 4), torch.eye(3)], 1))
    assert torch.allclose(x, per_code[codes])  # each code's mean-latent sample


# --------------------------------------------------------------------------------------------- the loss
def _gaussian_w2_reference(m1, s1, m2, s2) -> float:
    from scipy.linalg import sqrtm

    r = sqrtm(s2)
    cross = np.real(sqrtm(r @ s1 @ r))
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(cross))


def test_component_w2_loss_matches_closed_form_and_bounds_mw2():
    g = torch.Generator().manual_seed(0)
    k, n, d, reg = 3, 40, 4, 1e-3
    scale = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)[:, None, None]
    x = torch.randn(k, n, d, generator=g, dtype=torch.float64) * scale
    a = torch.randn(k, d, d, generator=g, dtype=torch.float64)
    target = GMM(torch.full((k,), 1 / k, dtype=torch.float64), torch.randn(k, d, generator=g, dtype=torch.float64),
                 a @ a.transpose(1, 2) + 0.1 * torch.eye(d, dtype=torch.float64))
    loss = component_w2_loss(x, target, reg)
    xs = x.numpy()
    expected = 0.0
    for j in range(k):
        mean = xs[j].mean(0)
        cov = (xs[j] - mean).T @ (xs[j] - mean) / n + reg * np.eye(d)
        expected += _gaussian_w2_reference(mean, cov, target.means[j].numpy(), target.covariances[j].numpy()) / k
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    mean = x.mean(1)
    cov = (x - mean[:, None]).transpose(1, 2) @ (x - mean[:, None]) / n + reg * torch.eye(d, dtype=torch.float64)
    generated = GMM(target.weights, mean, cov)
    assert float(mw2(generated, target)) <= float(loss) + 1e-9  # one plan among all: an upper bound
    xg = x.clone().requires_grad_()
    component_w2_loss(xg, target, reg).backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="must be"):
        component_w2_loss(x[:, :1], target, reg)


def test_data_sliced_w2_matches_quantiles_of_the_training_set():
    """Each direction's 1-D W2² pairs the sorted generated projections with NumPy's inverted-CDF quantiles of all
    training projections at the midpoints (j + ½)/b."""
    trainer = _digits_trainer(k=4, batch=64)
    x = torch.rand(48, 64, generator=torch.Generator().manual_seed(2))
    state = trainer.rng.get_state()
    value = trainer.data_sliced_w2(x)
    trainer.rng.set_state(state)
    theta = torch.randn(SLICED_DIRECTIONS, 64, generator=trainer.rng)
    theta = (theta / theta.norm(dim=1, keepdim=True)).double().numpy()
    px = np.sort(x.double().numpy() @ theta.T, axis=0)
    levels = (np.arange(48) + 0.5) / 48
    py = np.quantile(trainer.data.double().numpy() @ theta.T, levels, axis=0, method="inverted_cdf")
    assert float(value) == pytest.approx(float(((px - py) ** 2).mean()), rel=1e-4)
    xg = x.clone().requires_grad_()
    trainer.data_sliced_w2(xg).backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


@pytest.mark.parametrize("weight", [None, 0.0, 3.0])
def test_components_step_is_the_component_loss_plus_the_weighted_sliced_term(weight):
    trainer = _digits_trainer(k=4, batch=64, sliced_weight=weight)
    assert trainer.sliced_weight == (SLICED_WEIGHT if weight is None else weight)
    state = trainer.rng.get_state()
    with torch.no_grad():
        x = trainer.net(trainer.coded_latent())
        expected = component_w2_loss(x.reshape(4, 16, 64), trainer.real_fit, trainer.reg_covar)
        if trainer.sliced_weight:
            expected = expected + trainer.sliced_weight * trainer.data_sliced_w2(x)
    trainer.rng.set_state(state)
    assert trainer.step() == pytest.approx(float(expected), rel=1e-5)


# --------------------------------------------------------------------------------------------- the trainer
def test_components_target_trains_digits_towards_the_data():
    data = load_samples("digits", seed=0)
    trainer = _digits_trainer(k=8, z_dim=8, batch=256, lr=3e-3)
    assert trainer.n_codes == 8 and torch.allclose(trainer.real_fit.weights, torch.full((8,), 1 / 8))
    before = generated_sliced_w2(trainer.sample(300, seed=1), data.test[:300])
    history = trainer.train(80)
    after = generated_sliced_w2(trainer.sample(300, seed=1), data.test[:300])
    assert after < 0.5 * before, (before, after)
    assert sum(history[-10:]) < 0.5 * sum(history[:10])


def test_components_checkpoint_resumes_exactly_with_the_schedule(tmp_path):
    def make():
        return _digits_trainer(k=3, batch=30, total_steps=8, lr=1e-2)

    assert_resumes_exactly(make, 3, 3, lambda state: load_checkpoint(save_checkpoint(tmp_path / "ckpt.pt", state)))
    trainer = make()
    trainer.train(4)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * (1 - 3 / 8))  # set before step 4


def test_k_is_the_deprecated_name_of_n_components_and_argument_checks():
    data = load_samples("digits", seed=0)
    net = make_generator(4, 64, 8, seed=0, output="sigmoid")
    with pytest.warns(DeprecationWarning, match="'k' is renamed 'n_components'"):
        alias = MW2GeneratorTrainer(net, data.train, z_dim=4, k=3, batch=64, seed=0, target="data")
    assert alias.k == 3 and alias.n_codes == 0
    with pytest.raises(ValueError, match="batch"):
        _digits_trainer(k=4, batch=6)
    with pytest.raises(ValueError, match="total_steps"):
        _digits_trainer(total_steps=0)
    for weight in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sliced_weight"):
            _digits_trainer(sliced_weight=weight)
    assert alias.sliced_weight == 0.0  # the other targets have no sliced term
    with pytest.raises(ValueError, match="sliced_weight"):
        MW2GeneratorTrainer(net, data.train, z_dim=4, n_components=3, batch=64, target="data", sliced_weight=1.0)


def test_nearest_train_distance_flags_copies():
    data = load_samples("digits", seed=0)
    copies = nearest_train_distance(data.train[:100], data.train, data.test[:100])
    assert copies["generated"] == 0.0 and copies["ratio"] == 0.0
    real = nearest_train_distance(data.test[100:200], data.train, data.test[:100])
    assert 0.7 < real["ratio"] < 1.4


# --------------------------------------------------------------------------------------------- apps
def test_apps_components_target_and_generate_truncation(tmp_path, capsys):
    out = tmp_path / "digits"
    argv = ["--data", "digits", "--k", "4", "--batch", "64", "--hidden", "16", "--eval-samples", "200",
            "--output", str(out), "--quiet"]
    assert run("train_generator", train_generator.main, [*argv, "--iters", "4", "--save-every", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["target"] == "components" and metrics["steps"] == 4
    assert 0 <= metrics["digit_classifier"]["mean_max_probability"] <= 1
    assert metrics["nearest_train_distance"]["generated"] > 0
    assert run("train_generator", train_generator.main, [*argv, "--iters", "6", "--resume"]) == 0
    assert json.loads((out / "metrics.json").read_text())["resumed_from_step"] == 4
    ckpt = str(out / "checkpoint.pt")

    def samples(*extra: str) -> tuple[torch.Tensor, dict]:
        dest = tmp_path / f"gen{'_'.join(extra)}"
        assert run("generate", generate.main, [ckpt, "--n", "40", "--output", str(dest), "--quiet", *extra]) == 0
        return torch.load(dest / "samples.pt"), json.loads((dest / "metrics.json").read_text())

    default, info = samples()
    assert default.shape == (40, 1, 8, 8) and info["truncation"] == generate.CODED_TRUNCATION  # coded: ψ < 1
    assert 0 <= info["digit_classifier"]["mean_max_probability"] <= 1 and info["sliced_w2_held_out"] > 0
    assert torch.equal(samples("--truncation", str(generate.CODED_TRUNCATION))[0], default)
    plain, info1 = samples("--truncation", "1")
    assert info1["truncation"] == 1.0 and not torch.equal(plain, default)
    zero, info0 = samples("--truncation", "0")
    assert info0["truncation"] == 0.0
    assert len(torch.unique(zero.reshape(40, -1), dim=0)) <= 4  # one sample per component code
    capsys.readouterr()
    assert run("generate", generate.main, [ckpt, "--truncation", "1.5", "--output", str(tmp_path / "x")]) == 2
    assert "[0, 1]" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert run("train_generator", train_generator.main, ["--data", "digits", "--k", "40", "--batch", "64",
                                                         "--output", str(tmp_path / "y")]) == 2
    assert "twice" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_generate_rejects_truncation_of_a_texture(tmp_path, capsys):
    texture = tmp_path / "texture"
    argv = ["--data", "texture", "--size", "32", "--iters", "1", "--tileable", "--output", str(texture), "--quiet"]
    assert run("train_generator", train_generator.main, argv) == 0
    capsys.readouterr()
    out = tmp_path / "never"
    assert run("generate", generate.main, [str(texture / "checkpoint.pt"), "--size", "32", "--truncation", "0.5",
                                           "--output", str(out)]) == 2
    assert "vector checkpoints" in capsys.readouterr().err and not out.exists()


def test_old_mlp_checkpoints_without_codes_still_load(tmp_path):
    """Checkpoints written before component codes existed (no ``n_codes`` in the spec) sample as before."""
    out = tmp_path / "ring"
    assert run("train_generator", train_generator.main, ["--iters", "2", "--batch", "64", "--hidden", "16",
                                                         "--eval-samples", "100", "--output", str(out), "--quiet"]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    del state["generator"]["n_codes"]
    old = Path(tmp_path / "old.pt")
    torch.save(state, old)
    assert run("generate", generate.main, [str(old), "--n", "10", "--output", str(tmp_path / "g"), "--quiet"]) == 0
    net = make_generator(8, 2, 16)
    net.load_state_dict(state["trainer"]["net"])
    with torch.no_grad():
        expected = net(torch.randn(10, 8, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(torch.load(tmp_path / "g" / "samples.pt"), expected)
