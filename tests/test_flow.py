"""Tests of imgmw.flow: the optimisation driver (step rules, schedule, callback, stopping, divergence) and
the refit diagnostic."""
from __future__ import annotations

import math

import pytest
import torch

from imgmw import GMM, fit_gmm, mw2
from imgmw.flow import SYNC_EVERY, FlowDivergence, plateau, refit_mw2, run_flow


def _quadratic(centre: torch.Tensor):
    """``objective(x, t) = ½‖x − c‖²`` per point ``[N]``."""
    return lambda x, _: 0.5 * (x - centre).square().sum(-1)


def test_gd_step_is_the_explicit_euler_step():
    x0 = torch.zeros(3, 2, dtype=torch.float64)
    c = torch.tensor([[1.0, 2.0], [3.0, 4.0], [-1.0, 0.0]], dtype=torch.float64)
    out = run_flow(x0, _quadratic(c), n_iter=1, lr=0.25)
    torch.testing.assert_close(out.x, 0.25 * c)              # x − lr·(x − c)
    assert out.losses == [pytest.approx(0.5 * float(c.square().sum()))]
    assert torch.equal(x0, torch.zeros(3, 2, dtype=torch.float64))   # the start is not modified


def test_point_mass_and_trust_region():
    """Wasserstein step: gradients divided by the point masses; each step capped at max_step in length."""
    x0 = torch.zeros(2, 2, dtype=torch.float64)
    c = torch.tensor([[1.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    mass = torch.tensor([0.5, 0.5], dtype=torch.float64)
    out = run_flow(x0, _quadratic(c), n_iter=1, lr=0.1, point_mass=mass)
    torch.testing.assert_close(out.x, 0.2 * c)
    capped = run_flow(x0, _quadratic(c), n_iter=1, lr=0.1, point_mass=mass, max_step=1.0)
    torch.testing.assert_close(capped.x, torch.tensor([[0.2, 0.0], [0.0, 1.0]], dtype=torch.float64))


def test_linear_schedule_and_callback():
    seen = []
    x0 = torch.zeros(1, 1, dtype=torch.float64)
    c = torch.ones(1, 1, dtype=torch.float64)
    out = run_flow(x0, _quadratic(c), n_iter=4, lr=0.5, schedule="linear",
                   callback=lambda t, loss, x: seen.append((t, float(loss), float(x))))
    # factors 1, 3/4, 1/2, 1/4: x_{t+1} = x_t + lr·f_t·(1 − x_t)
    x, expect = 0.0, []
    for t, f in enumerate((1.0, 0.75, 0.5, 0.25)):
        loss = 0.5 * (1 - x) ** 2
        x = x + 0.5 * f * (1 - x)
        expect.append((t, pytest.approx(loss), pytest.approx(x)))
    assert seen == expect
    assert out.n_steps == 4 and out.terms.shape == (4, 1)


@pytest.mark.parametrize("step", ["adam", "lbfgs"])
def test_optimiser_rules_reach_the_minimum(step):
    c = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    out = run_flow(torch.zeros(1, 2, dtype=torch.float64), _quadratic(c), n_iter=200 if step == "adam" else 10,
                   lr=0.1 if step == "adam" else 1.0, step=step)
    torch.testing.assert_close(out.x, c, atol=1e-3, rtol=0)


def test_lbfgs_evaluations_of_one_step_share_its_index():
    calls = []

    def objective(x, t):
        calls.append(t)
        return (x - 1).square().sum()[None]

    run_flow(torch.zeros(3, dtype=torch.float64), objective, n_iter=3, lr=1.0, step="lbfgs")
    assert sorted(set(calls)) == [0, 1, 2] and calls == sorted(calls)


def test_projection_runs_after_every_step():
    out = run_flow(torch.zeros(4, 1), lambda x, _: -(x.sum())[None], n_iter=5, lr=1.0,
                   project=lambda x: x.clamp_(0.0, 0.3))
    assert torch.all(out.x == 0.3)


def test_plateau_stops_early():
    """``stop`` is asked at the sync points (every SYNC_EVERY steps), so the flow ends at one of them; with
    ``sync_every=1`` at the first step where the rule holds."""
    x0, c = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    out = run_flow(x0, _quadratic(c), n_iter=1000, lr=0.5, stop=plateau(tol=1e-6, window=5))
    assert out.stopped and out.n_steps < 200 and out.n_steps % SYNC_EVERY == 0
    assert out.final_loss < 1e-6 and len(out.losses) == out.n_steps
    rule = plateau(tol=1e-6, window=5)
    every = run_flow(x0, _quadratic(c), n_iter=1000, lr=0.5, stop=rule, sync_every=1)
    first = next(t for t in range(1, 1000) if rule(every.losses[:t]))
    assert every.n_steps == first and every.n_steps <= out.n_steps < every.n_steps + SYNC_EVERY
    with pytest.raises(ValueError, match="window"):
        plateau(window=0)


def test_divergence_names_the_step_size():
    """Gradient descent on ½x² with lr = 3 multiplies x by −2 per step: exploding, caught, lr named."""
    with pytest.raises(FlowDivergence, match=r"lr=3"):
        run_flow(torch.ones(1, 1, dtype=torch.float64), _quadratic(torch.zeros(1, 1, dtype=torch.float64)),
                 n_iter=200, lr=3.0)
    with pytest.raises(FlowDivergence, match="became nan"):
        run_flow(torch.ones(1, 1), lambda x, t: (x.sum() * (math.nan if t == 2 else 1.0))[None], n_iter=5, lr=0.1)
    with pytest.raises(FlowDivergence, match="variables became non-finite"):
        run_flow(torch.ones(1, 1), lambda x, _: (x * 1e38).sum()[None], n_iter=2, lr=1e38)


@pytest.mark.parametrize("sync_every", [1, 4, SYNC_EVERY, 1000])
def test_a_divergence_is_reported_at_its_step_whatever_the_sync_interval(sync_every):
    """The losses are read in batches, but every step of a batch is checked in order: the message names the
    step where the loss exploded, the same as when every step is read. Gradient descent with lr = 3 on
    ``½x² − ½`` from x = 1 takes x to (−2)ᵗ: the loss ``½·4ᵗ − ½`` starts at 0 (no stall rule) and first
    exceeds 1e6 × the early maximum 127.5 at step 14; the stall rule (on ``½x²``) fires from step 2 to 6."""
    x0 = torch.ones(1, 1, dtype=torch.float64)
    with pytest.raises(FlowDivergence, match=r"at step 14: the loss grew to 1.34e\+08 .*lr=3\)"):
        run_flow(x0, lambda x, _: 0.5 * x.square().sum(-1) - 0.5, n_iter=40, lr=3.0, sync_every=sync_every)
    with pytest.raises(FlowDivergence, match=r"from step 2 to 6: the loss stayed above 8,"):
        run_flow(x0, _quadratic(torch.zeros(1, 1, dtype=torch.float64)), n_iter=40, lr=3.0, sync_every=sync_every)


def test_an_objective_failing_on_diverged_points_is_a_divergence():
    """Between sync points the objective may see the non-finite points of a diverged step; the error it raises
    is reported as the divergence (naming the step and lr) when the pending steps show one, and passed on
    unchanged otherwise."""
    def objective(x, t):
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or inf")
        return (x * 1e38).sum()[None]

    with pytest.raises(FlowDivergence, match=r"at step 0: the variables became non-finite.*lr=1e\+38") as info:
        run_flow(torch.ones(1, 1), objective, n_iter=5, lr=1e38)
    assert isinstance(info.value.__cause__, ValueError)

    def failing(x, t):
        if t == 3:
            raise ValueError("not a divergence")
        return x.square().sum()[None]

    with pytest.raises(ValueError, match="not a divergence") as info:
        run_flow(torch.ones(1, 1), failing, n_iter=5, lr=0.1)
    assert not isinstance(info.value, FlowDivergence)


def test_callback_gets_the_loss_on_the_device_every_step():
    """``callback`` runs after every step with ``E_t`` as a 0-d tensor (no host read); ``losses`` holds the same
    values as floats once the flow returns."""
    seen = []
    out = run_flow(torch.ones(3, 2), lambda x, _: x.square().sum(-1), n_iter=7, lr=0.1, sync_every=3,
                   callback=lambda t, loss, x: seen.append((t, loss)))
    assert [t for t, _ in seen] == list(range(7))
    assert all(isinstance(loss, torch.Tensor) and loss.dim() == 0 for _, loss in seen)
    assert [float(loss) for _, loss in seen] == out.losses and len(out.losses) == 7
    torch.testing.assert_close(out.terms.sum(1), torch.tensor(out.losses))


def test_bad_arguments_are_value_errors():
    x = torch.zeros(2, 2)
    for kwargs, match in ((dict(lr=0.0), "lr"), (dict(lr=1.0, step="sgd"), "step"), (dict(lr=1.0, n_iter=-1), "n_iter"),
                          (dict(lr=1.0, schedule="cosine"), "schedule"),
                          (dict(lr=1.0, point_mass=torch.ones(3)), "point_mass"),
                          (dict(lr=1.0, step="adam", point_mass=torch.ones(2)), "point_mass"),
                          (dict(lr=1.0, max_step=-1.0), "max_step"),
                          (dict(lr=1.0, step="adam", max_step=1.0), "max_step"),
                          (dict(lr=1.0, sync_every=0), "sync_every")):
        kwargs.setdefault("n_iter", 1)
        with pytest.raises(ValueError, match=match):
            run_flow(x, lambda v, _: v.sum()[None], **kwargs)


def test_refit_mw2_is_zero_for_the_targets_own_samples_and_positive_elsewhere():
    g = torch.Generator().manual_seed(0)
    target = GMM(torch.tensor([0.3, 0.7], dtype=torch.float64),
                 torch.tensor([[-4.0, 0.0], [4.0, 0.0]], dtype=torch.float64),
                 torch.eye(2, dtype=torch.float64).expand(2, 2, 2) * 0.5)
    # exactly 30 % / 70 % of the points from each component (a sampled split would cost |Δw|·‖Δm‖² ≈ 0.2)
    x = torch.cat([target.means[k] + 0.5 ** 0.5 * torch.randn(n, 2, generator=g, dtype=torch.float64)
                   for k, n in ((0, 6000), (1, 14000))])
    assert float(refit_mw2(x, target, generator=g)) < 1e-3
    assert float(refit_mw2(x + 1.0, target, generator=g)) > 1.5     # a shift by (1, 1) costs ‖(1, 1)‖² = 2
    # best of several starts: never worse in likelihood than a single start from the same generator stream
    single = fit_gmm(x, 2, n_iter=100, grad="none", generator=torch.Generator().manual_seed(5))
    best = refit_mw2(x, target, n_init=3, generator=torch.Generator().manual_seed(5))
    assert float(best) <= float(mw2(single.gmm, target)) + 1e-9


def test_precondition_acts_on_every_gd_step():
    """A preconditioner that averages the step over the points moves them together (the field's mean)."""
    x0 = torch.zeros(2, 1, dtype=torch.float64)
    c = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
    out = run_flow(x0, _quadratic(c), n_iter=1, lr=0.5,
                   precondition=lambda d: d.mean(0, keepdim=True).expand_as(d))
    torch.testing.assert_close(out.x, torch.full((2, 1), 1.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="precondition"):
        run_flow(x0, _quadratic(c), n_iter=1, lr=0.5, step="adam", precondition=lambda d: d)


def test_a_projected_flow_pinned_far_above_its_start_is_a_divergence():
    """Adam with lr = 1e30 on values clamped to [0, 1]: every step throws them to the clamp, the loss stays
    finite and far above its start; the stall rule names lr. A sane lr on the same problem runs through."""
    target = torch.full((64, 3), 0.5)
    objective = lambda x, _: ((x - target) ** 2).sum()[None]  # noqa: E731
    start = torch.full((64, 3), 0.45)
    with pytest.raises(FlowDivergence, match=r"more than 10x its starting .*lr=1e\+30"):
        run_flow(start, objective, n_iter=20, lr=1e30, step="adam", project=lambda x: x.clamp_(0, 1))
    ok = run_flow(start, objective, n_iter=20, lr=0.01, step="adam", project=lambda x: x.clamp_(0, 1))
    assert ok.losses[-1] < ok.losses[0]


def test_a_huge_gd_step_with_a_cap_moves_by_the_cap():
    """``max_step`` caps each point's step even when ``lr·∇`` overflows the norm (was a silent no-op)."""
    x = torch.zeros(5, 3)
    result = run_flow(x, _quadratic(torch.ones(5, 3)), n_iter=1, lr=1e30, max_step=0.1)
    torch.testing.assert_close(result.x.norm(dim=-1), torch.full((5,), 0.1))


def test_lbfgs_line_search_failure_is_a_divergence_but_a_bad_start_is_not():
    def objective(x, _):
        if not bool((x.abs() < 1e6).all()):
            raise ValueError("points far outside the data range")
        return (x ** 2).sum()[None]

    with pytest.raises(FlowDivergence, match=r"trial point of the line search .*lr=1e\+30"):
        run_flow(torch.ones(4, 2), objective, n_iter=3, lr=1e30, step="lbfgs")
    with pytest.raises(ValueError, match="far outside") as info:
        run_flow(torch.full((4, 2), 1e7), objective, n_iter=3, lr=1.0, step="lbfgs")
    assert not isinstance(info.value, FlowDivergence)
