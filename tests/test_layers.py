"""Tests of imgmw.layers.EMLayer: EM as a neural operator with learnable residual corrections."""
from __future__ import annotations

import math

import pytest
import torch

import imgmw.layers as layers
from imgmw.em import fit_gmm
from imgmw.gmm import GMM
from imgmw.init import init_gmm
from imgmw.layers import (EMLayer, apply_correction, data_frame, floor_eigenvalues, n_mlp_features, nll_loss,
                          responsibility_moments)

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread avoids OpenMP overhead on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def blobs(b: int, n: int, d: int, k: int, seed: int, spread: float = 3.0, dtype=F64) -> torch.Tensor:
    """``[b, n, d]`` points around ``k`` random centres (unit-variance clusters, overlapping for small spread)."""
    g = torch.Generator().manual_seed(seed)
    centres = spread * torch.randn(b, k, d, generator=g, dtype=dtype)
    labels = torch.randint(0, k, (b, n), generator=g)
    x = torch.take_along_dim(centres, labels.unsqueeze(-1), dim=-2)
    return x + torch.randn(b, n, d, generator=g, dtype=dtype)


def kpp(x: torch.Tensor, k: int, seed: int = 0) -> GMM:
    return init_gmm(x, k, "kmeans++", generator=torch.Generator().manual_seed(seed))


def randomise(layer: EMLayer, scale: float, seed: int) -> EMLayer:
    """Overwrite every MLP parameter with ``scale · N(0, 1)`` (the zero last layers included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "mlp" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


def assert_spd_with_floor(cov: torch.Tensor, eps: float) -> None:
    assert torch.isfinite(cov).all()
    torch.testing.assert_close(cov, cov.mT, rtol=0, atol=1e-12 * float(cov.abs().max()))
    assert (torch.linalg.cholesky_ex(cov).info == 0).all()
    lam = torch.linalg.eigvalsh(cov.double())
    rounding = 10 * cov.shape[-1] * torch.finfo(cov.dtype).eps * float(lam.max())  # eigenvalue accuracy
    assert float(lam.min()) >= eps - rounding


# ----------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("start", ["kmeans++", "learned", "given"])
def test_shapes_and_decoder(start):
    torch.manual_seed(0)
    x = blobs(2, 40, 3, 2, seed=1).reshape(2, 1, 40, 3).expand(2, 3, 40, 3)  # *B = (2, 3)
    layer = randomise(EMLayer(4, 3, 2, init=start).double(), 0.2, seed=2)
    init = kpp(x, 4) if start == "given" else None
    gmm, log_resp, ll = layer(x, init=init)
    assert gmm.weights.shape == (2, 3, 4) and gmm.means.shape == (2, 3, 4, 3)
    assert gmm.covariances.shape == (2, 3, 4, 3, 3)
    assert log_resp.shape == (2, 3, 40, 4) and ll.shape == (2, 3)
    torch.testing.assert_close(log_resp.exp().sum(-1), torch.ones(2, 3, 40, dtype=F64))
    # decoder against torch.distributions (an independent mixture density)
    mix = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=gmm.weights.detach().unsqueeze(-2)),
        torch.distributions.MultivariateNormal(gmm.means.detach().unsqueeze(-3),
                                               gmm.covariances.detach().unsqueeze(-4)))
    torch.testing.assert_close(ll.detach(), mix.log_prob(x).sum(-1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k, d", [(1, 1), (1, 3), (3, 1)])
def test_edge_sizes_stay_finite(k, d):
    x = blobs(2, 20, d, max(k, 2), seed=36)
    layer = randomise(EMLayer(k, d, 2).double(), 0.5, seed=37)
    gmm, log_resp, ll = layer(x)
    ll.sum().backward()
    assert gmm.means.shape == (2, k, d) and torch.isfinite(log_resp).all() and torch.isfinite(ll).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    assert_spd_with_floor(gmm.covariances.detach(), layer.reg_covar)


def test_mlp_input_width_matches_features():
    layer = EMLayer(3, 5, 1)
    assert layer.mean_mlp.net[0].in_features == n_mlp_features(5) == 12 * 5 + 13


# ----------------------------------------------------------------------------------------------- identity
@pytest.mark.parametrize("residual_every_step", [True, False])
@pytest.mark.parametrize("fixed_weights", [False, True])
def test_untrained_layer_is_exactly_em(residual_every_step, fixed_weights):
    x = blobs(3, 60, 3, 3, seed=3, spread=2.0)
    init = kpp(x, 3)
    if fixed_weights:
        init = GMM(torch.full_like(init.weights, 1 / 3), init.means, init.covariances)
    layer = EMLayer(3, 3, 4, residual_every_step=residual_every_step, fixed_weights=fixed_weights).double()
    gmm, log_resp, ll = layer(x, init=init)
    ref = fit_gmm(x, 3, n_iter=4, init=init, fixed_weights=fixed_weights)
    for ours, theirs in ((gmm.weights, ref.gmm.weights), (gmm.means, ref.gmm.means),
                         (gmm.covariances, ref.gmm.covariances), (log_resp, ref.log_resp)):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(ll, ref.gmm.log_prob(x).sum(-1), rtol=1e-10, atol=0)


@pytest.mark.parametrize("fixed_weights", [False, True])
def test_untrained_default_layer_is_em_from_kmeans_plus_plus(fixed_weights):
    """The default start is fit_gmm's: the same seeded k-means++ draw, so the untrained layer is plain EM."""
    x = blobs(3, 60, 3, 3, seed=38, spread=2.0)
    layer = EMLayer(3, 3, 4, fixed_weights=fixed_weights, generator=torch.Generator().manual_seed(5)).double()
    gmm, _, _ = layer(x)
    ref = fit_gmm(x, 3, n_iter=4, fixed_weights=fixed_weights, generator=torch.Generator().manual_seed(5)).gmm
    torch.testing.assert_close(gmm.means, ref.means, rtol=0, atol=1e-6)
    torch.testing.assert_close(gmm.weights, ref.weights, rtol=0, atol=1e-6)
    torch.testing.assert_close(gmm.covariances, ref.covariances, rtol=0, atol=1e-6)


def test_learn_init_is_deprecated_and_mapped():
    with pytest.warns(DeprecationWarning, match="init='learned'"):
        assert EMLayer(2, 2, 1, learn_init=True).init == "learned"
    with pytest.warns(DeprecationWarning):
        assert EMLayer(2, 2, 1, learn_init=False).init == "given"


def test_untrained_learned_init_is_exactly_em():
    torch.manual_seed(4)
    x = blobs(2, 50, 2, 3, seed=5)
    layer = EMLayer(3, 2, 3, init="learned").double()
    init = layer.initial_gmm(x)
    centre, scale = data_frame(x, None, layer.reg_covar)
    torch.testing.assert_close(init.means, centre.unsqueeze(-2) + scale.unsqueeze(-2) * layer.init_means)
    gmm, _, _ = layer(x)
    ref = fit_gmm(x, 3, n_iter=3, init=init)
    torch.testing.assert_close(gmm.means, ref.gmm.means, rtol=0, atol=1e-6)
    torch.testing.assert_close(gmm.covariances, ref.gmm.covariances, rtol=0, atol=1e-6)


def test_no_residual_is_em_even_with_learned_init_gradients():
    torch.manual_seed(6)
    x = blobs(2, 30, 2, 2, seed=7)
    layer = EMLayer(2, 2, 2, residual=False, init="learned").double()
    gmm, _, ll = layer(x)
    ref = fit_gmm(x, 2, n_iter=2, init=layer.initial_gmm(x).detach())
    torch.testing.assert_close(gmm.means, ref.gmm.means, rtol=0, atol=1e-10)
    ll.sum().backward()
    assert layer.init_means.grad is not None and torch.isfinite(layer.init_means.grad).all()


# ----------------------------------------------------------------------------------------------- masks
def test_masked_points_are_excluded_exactly():
    torch.manual_seed(8)
    x = blobs(2, 50, 2, 3, seed=9)
    mask = torch.ones(2, 50, dtype=torch.bool)
    mask[1, 35:] = False
    x_garbage = x.clone()
    x_garbage[1, 35:] = float("nan")
    layer = randomise(EMLayer(3, 2, 2, init="learned").double(), 0.3, seed=10)
    gmm, _, ll = layer(x_garbage, mask=mask)
    gmm_1, _, ll_1 = layer(x[1:, :35])
    torch.testing.assert_close(gmm.means[1:], gmm_1.means, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gmm.covariances[1:], gmm_1.covariances, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ll[1:], ll_1, rtol=1e-10, atol=0)


# ----------------------------------------------------------------------------------------------- SPD
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_spd_and_finite_under_huge_random_corrections(dtype):
    torch.manual_seed(11)
    reg = 1e-3
    x = blobs(4, 80, 3, 3, seed=12, dtype=dtype)
    layer = randomise(EMLayer(3, 3, 3, reg_covar=reg).to(dtype), 30.0, seed=13)
    gmm, log_resp, ll = layer(x.requires_grad_(), init=kpp(x.detach(), 3))
    plain = fit_gmm(x.detach(), 3, n_iter=3, init=kpp(x.detach(), 3)).gmm
    assert (gmm.means - plain.means).abs().max() > 1e-2  # the corrections really act
    assert_spd_with_floor(gmm.covariances.detach(), reg)
    assert torch.isfinite(log_resp).all() and torch.isfinite(ll).all()
    ll.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


def _identity_gmm(b: int, k: int, d: int) -> GMM:
    g = torch.Generator().manual_seed(14)
    return GMM(torch.full((b, k), 1 / k, dtype=F64), torch.randn(b, k, d, generator=g, dtype=F64),
               torch.eye(d, dtype=F64).expand(b, k, d, d).clone())


def test_correction_structure_and_bounds():
    b, k, d = 3, 4, 3
    gmm = _identity_gmm(b, k, d)  # L⁺ = I and no EM step (prev = gmm): Σ' = M Mᵀ, μ' = μ + MEAN_BOUND tanh r_μ
    g = torch.Generator().manual_seed(15)
    raw_mean = 3 * torch.randn(b, k, d + 1, generator=g, dtype=F64)
    raw_chol = 3 * torch.randn(b, k, d + d * (d - 1) // 2 + 1, generator=g, dtype=F64)
    out = apply_correction(gmm, gmm, raw_mean, raw_chol, None, reg_covar=1e-9)
    torch.testing.assert_close(out.means - gmm.means, layers.MEAN_BOUND * torch.tanh(raw_mean[..., :d]))
    expected = torch.zeros(b, k, d, d, dtype=F64)
    diag = 2 * layers.LOG_DIAG_BOUND * torch.tanh(layers.LOG_DIAG_BOUND * torch.tanh(raw_chol[..., :d])
                                                  / (2 * layers.LOG_DIAG_BOUND))
    expected[..., range(d), range(d)] = diag.exp()
    lower = layers.LOWER_BOUND * torch.tanh(raw_chol[..., d:-1])
    expected[..., 1, 0], expected[..., 2, 0], expected[..., 2, 1] = lower[..., 0], lower[..., 1], lower[..., 2]
    # M is lower triangular with a positive diagonal, so it is the Cholesky factor of Σ' = M Mᵀ
    torch.testing.assert_close(torch.linalg.cholesky(out.covariances), expected)
    torch.testing.assert_close(out.weights, gmm.weights)


def test_correction_is_bounded_for_extreme_outputs():
    b, k, d = 2, 3, 2
    prev = _identity_gmm(b, k, d)
    new = GMM(torch.tensor([0.5, 0.3, 0.2], dtype=F64).expand(b, k), prev.means + 0.5, 4.0 * prev.covariances)
    huge = 1e6
    raw = [huge * torch.sign(torch.randn(b, k, n, generator=torch.Generator().manual_seed(16), dtype=F64))
           for n in (d + 1, d + 2, 2)]
    out = apply_correction(new, prev, *raw, reg_covar=1e-6)
    step = new.means - prev.means
    bound = layers.MEAN_BOUND * 2.0 * math.sqrt(d) + layers.GAIN_BOUND * step.norm(dim=-1)  # ‖L⁺ tanh‖ ≤ 2√d
    assert ((out.means - new.means).norm(dim=-1) <= bound + 1e-12).all()
    # L⁺ = 2I, so the Cholesky diagonal of Σ' is 2·exp(δ) with |δ| ≤ 2·LOG_DIAG_BOUND
    ratio = torch.linalg.cholesky(out.covariances).diagonal(dim1=-2, dim2=-1) / 2.0
    assert (ratio.log().abs() <= 2 * layers.LOG_DIAG_BOUND + 1e-9).all()
    assert_spd_with_floor(out.covariances, 1e-6)
    log_w_change = (out.weights.log() - new.weights.log())
    centred = log_w_change - log_w_change.mean(-1, keepdim=True)
    assert (centred.abs() <= 4 * layers.LOGIT_BOUND + 1e-9).all()


def test_zero_outputs_leave_the_em_output_unchanged():
    gmm = _identity_gmm(2, 3, 2)
    prev = GMM(gmm.weights, gmm.means - 1.0, 2 * gmm.covariances)
    zeros = [torch.zeros(2, 3, n, dtype=F64) for n in (3, 4, 2)]
    out = apply_correction(gmm, prev, *zeros, reg_covar=1e-6)
    assert torch.equal(out.means, gmm.means) and torch.equal(out.weights, gmm.weights)
    torch.testing.assert_close(out.covariances, gmm.covariances, rtol=1e-15, atol=0)


def test_floor_eigenvalues_closed_form():
    g = torch.Generator().manual_seed(17)
    q, _ = torch.linalg.qr(torch.randn(5, 3, 3, generator=g, dtype=F64))
    lam = torch.tensor([1e-8, 0.5, 2.0], dtype=F64)
    cov = (q * lam) @ q.mT
    out = floor_eigenvalues(cov, 1e-3)
    torch.testing.assert_close(torch.linalg.eigvalsh(out), (lam + (1e-3 - 1e-8)).expand(5, 3))
    well = floor_eigenvalues(cov + 0.1 * torch.eye(3, dtype=F64), 1e-3)
    assert torch.equal(well, cov + 0.1 * torch.eye(3, dtype=F64))


def test_responsibility_moments_vanish_in_expectation_and_detect_bimodality():
    g = torch.Generator().manual_seed(18)
    one = GMM(torch.ones(1, 1, dtype=F64), torch.zeros(1, 1, 2, dtype=F64), torch.eye(2, dtype=F64).expand(1, 1, 2, 2))
    gauss = torch.randn(1, 20000, 2, generator=g, dtype=F64)
    skew, kurt = responsibility_moments(one, one, gauss, None, chunk_size=3000)
    assert skew.abs().max() < 0.05 and kurt.abs().max() < 0.05
    # two tight clusters at ±(1, 0) seen as one unit Gaussian: E‖z‖⁴ = 1 → kurt = 1/8 − 1
    two = torch.cat([torch.tensor([[1.0, 0.0]], dtype=F64).expand(500, 2),
                     torch.tensor([[-1.0, 0.0]], dtype=F64).expand(500, 2)]).unsqueeze(0)
    skew, kurt = responsibility_moments(one, one, two, None)
    torch.testing.assert_close(kurt, torch.full((1, 1), 1 / 8 - 1, dtype=F64))
    torch.testing.assert_close(skew, torch.zeros(1, 1, 2, dtype=F64))
    # weights act like repeated points: duplicate one cluster's weight → skewness towards it
    weight = torch.cat([torch.full((500,), 3.0), torch.ones(500)]).to(F64).unsqueeze(0)
    skew, _ = responsibility_moments(one, one, two, weight)
    assert skew[0, 0, 0] > 0.05 and abs(float(skew[0, 0, 1])) < 1e-12


# ----------------------------------------------------------------------------------------------- equivariance
def test_permuting_initial_components_permutes_outputs():
    torch.manual_seed(19)
    x = blobs(3, 60, 2, 3, seed=20, spread=2.0)
    layer = randomise(EMLayer(3, 2, 3, init="given").double(), 0.3, seed=21)
    init = kpp(x, 3)
    perm = torch.tensor([2, 0, 1])
    init_p = GMM(init.weights[:, perm], init.means[:, perm], init.covariances[:, perm])
    gmm, log_resp, ll = layer(x, init=init)
    gmm_p, log_resp_p, ll_p = layer(x, init=init_p)
    plain = fit_gmm(x, 3, n_iter=3, init=init).gmm
    assert (gmm.means - plain.means).abs().max() > 1e-3  # corrections are active
    torch.testing.assert_close(gmm_p.means, gmm.means[:, perm], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gmm_p.covariances, gmm.covariances[:, perm], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gmm_p.weights, gmm.weights[:, perm], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(log_resp_p, log_resp[..., perm], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ll_p, ll, rtol=1e-10, atol=0)


def test_permuting_learned_init_parameters_permutes_outputs():
    torch.manual_seed(22)
    x = blobs(2, 50, 2, 3, seed=23)
    layer = randomise(EMLayer(3, 2, 2, init="learned").double(), 0.3, seed=24)
    gmm, _, ll = layer(x)
    perm = torch.tensor([1, 2, 0])
    with torch.no_grad():
        for p in (layer.init_means, layer.init_chol, layer.init_logits):
            p.copy_(p[perm])
    gmm_p, _, ll_p = layer(x)
    torch.testing.assert_close(gmm_p.means, gmm.means[:, perm], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ll_p, ll, rtol=1e-10, atol=0)


# ----------------------------------------------------------------------------------------------- gradients
def test_gradcheck_points_init_and_weights():
    torch.manual_seed(25)
    x = blobs(1, 12, 2, 2, seed=26, spread=2.0)
    layer = randomise(EMLayer(2, 2, 2, init="given", hidden=6).double(), 0.3, seed=27)
    init = kpp(x, 2)
    w_last = layer.mean_mlp.net[-1].weight

    def run(x_, init_means, w):
        params = dict(layer.named_parameters())
        params["mean_mlp.net.4.weight"] = w
        g0 = GMM(init.weights, init_means, init.covariances)
        gmm, _, ll = torch.func.functional_call(layer, params, (x_,), {"init": g0})
        return ll, gmm.means, gmm.covariances, gmm.weights

    inputs = (x.clone().requires_grad_(), init.means.clone().requires_grad_(), w_last.detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradcheck_floor_eigenvalues_active():
    g = torch.Generator().manual_seed(28)
    q, _ = torch.linalg.qr(torch.randn(2, 3, 3, generator=g, dtype=F64))
    cov = ((q * torch.tensor([1e-4, 0.5, 2.0], dtype=F64)) @ q.mT).requires_grad_()
    assert torch.autograd.gradcheck(lambda c: floor_eigenvalues(0.5 * (c + c.mT), 1e-2), (cov,))


# ----------------------------------------------------------------------------------------------- training
def test_short_training_lowers_loss_and_keeps_covariances_spd(monkeypatch):
    torch.manual_seed(29)
    reg = 1e-6
    checked = []

    def checked_correction(*args, **kwargs):
        out = apply_correction(*args, **kwargs)
        assert_spd_with_floor(out.covariances.detach(), reg)
        checked.append(1)
        return out

    monkeypatch.setattr(layers, "apply_correction", checked_correction)
    x = blobs(8, 48, 2, 3, seed=30, spread=1.5, dtype=torch.float32)
    init = kpp(x, 3)
    layer = EMLayer(3, 2, 2, init="given")
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = nll_loss(layer(x, init=init)[2], n_points=48)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
        opt.step()
        losses.append(float(loss.detach()))
    assert len(checked) == 25 * 2
    em_2 = -float(fit_gmm(x, 3, n_iter=2, init=init).gmm.log_prob(x).mean())
    em_20 = -float(fit_gmm(x, 3, n_iter=20, init=init).gmm.log_prob(x).mean())
    assert losses[0] == pytest.approx(em_2, rel=1e-4)  # untrained = EM (float32: summation order differs, 2e-5 seen)
    assert losses[-1] < losses[0] - 0.25 * (em_2 - em_20)  # closes a quarter of EM's gap to 20 steps


def test_nll_loss_per_point():
    ll = torch.tensor([-10.0, -30.0])
    assert float(nll_loss(ll)) == 20.0
    assert float(nll_loss(ll, n_points=torch.tensor([5.0, 10.0]))) == 2.5


# ----------------------------------------------------------------------------------------------- state
def test_state_dict_round_trip(tmp_path):
    torch.manual_seed(31)
    x = blobs(2, 40, 2, 3, seed=32, dtype=torch.float32)
    layer = randomise(EMLayer(3, 2, 2, init="learned"), 0.3, seed=33)
    torch.save(layer.state_dict(), tmp_path / "layer.pt")
    torch.manual_seed(34)
    other = EMLayer(3, 2, 2, init="learned")
    other.load_state_dict(torch.load(tmp_path / "layer.pt", weights_only=True))
    for a, b in zip(layer(x), other(x)):
        for ta, tb in ((a.means, b.means), (a.covariances, b.covariances)) if isinstance(a, GMM) else ((a, b),):
            assert torch.equal(ta, tb)


# ----------------------------------------------------------------------------------------------- validation
def test_bad_arguments_raise_clear_errors():
    x = blobs(2, 20, 2, 2, seed=35, dtype=torch.float32)
    with pytest.raises(ValueError, match="n_components"):
        EMLayer(0, 2, 1)
    with pytest.raises(ValueError, match="n_iter"):
        EMLayer(2, 2, 0)
    with pytest.raises(ValueError, match="reg_covar"):
        EMLayer(2, 2, 1, reg_covar=-1.0)
    layer = EMLayer(2, 2, 1)
    with pytest.raises(ValueError, match=r"\[\*B, N, 2\]"):
        layer(torch.randn(2, 20, 3))
    with pytest.raises(ValueError, match="dtype"):
        layer(x.double())
    with pytest.raises(ValueError, match="init must be a GMM"):
        layer(x, init=kpp(x[:1], 2))
    with pytest.raises(ValueError, match="needs init"):
        EMLayer(2, 2, 1, init="given")(x)
    with pytest.raises(ValueError, match="init"):
        EMLayer(2, 2, 1, init="k-means")
    with pytest.raises(ValueError, match="no valid point"):
        layer(x, mask=torch.zeros(2, 20, dtype=torch.bool))
