"""Distributed EM against one process: real two-process gloo runs (tests/dist_cases.py, apps.fit_prior under
torch.distributed.run) compared with fits of the concatenated data in this process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import imgmw
from imgmw.init import init_gmm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dist_cases as cases  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-10


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "dist_cases.py"), str(out)], env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(cases.WORLD_SIZE)]


def _close(a: imgmw.GMM, b: imgmw.GMM, tol: float = TOL) -> None:
    for name in ("weights", "means", "covariances"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=tol, msg=name)


def _bitwise(a: imgmw.GMM, b: imgmw.GMM) -> None:
    for name in ("weights", "means", "covariances"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


PROBLEMS = cases.problems()


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_sharded_fit_equals_one_process_fit(ranks, name):
    p = PROBLEMS[name]
    ref = imgmw.fit_gmm(p["x"], 4, n_iter=200, tol=1e-9, init=cases.start_gmm(p["x"]))
    for r, res in enumerate(ranks):
        gmm, lower, n_iter, converged, log_resp = res[f"{name}/fit"]
        _close(gmm, ref.gmm)
        torch.testing.assert_close(lower, ref.lower_bound, rtol=0, atol=TOL)
        assert torch.equal(n_iter, ref.n_iter) and torch.equal(converged, ref.converged)
        torch.testing.assert_close(log_resp, cases.shard(ref.log_resp, r), rtol=0, atol=1e-8)
    _bitwise(ranks[0][f"{name}/fit"][0], ranks[1][f"{name}/fit"][0])  # every rank holds the same bits


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_sharded_fit_with_masks_and_weights(ranks, name):
    p = PROBLEMS[name]
    ref = imgmw.fit_gmm(p["x"], 4, n_iter=40, init=cases.start_gmm(p["x"]), mask=p["mask"], sample_weight=p["weight"])
    for res in ranks:
        gmm, lower = res[f"{name}/masked"]
        _close(gmm, ref.gmm)
        torch.testing.assert_close(lower, ref.lower_bound, rtol=0, atol=TOL)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_collective_kmeans_plus_plus_is_shared_and_equals_one_process(ranks, name):
    p = PROBLEMS[name]
    _bitwise(ranks[0][f"{name}/kmeans++"], ranks[1][f"{name}/kmeans++"])
    ref = init_gmm(p["x"], 4, "kmeans++", sample_weight=p["weight"], generator=torch.Generator().manual_seed(3))
    _close(ranks[0][f"{name}/kmeans++"], ref)
    ref = init_gmm(p["x"], 4, "kmeans", generator=torch.Generator().manual_seed(4))
    _close(ranks[0][f"{name}/kmeans"], ref)
    _bitwise(ranks[0][f"{name}/kmeans"], ranks[1][f"{name}/kmeans"])
    ref = imgmw.fit_gmm(p["x"], 4, n_iter=20, generator=torch.Generator().manual_seed(5)).gmm
    _close(ranks[1][f"{name}/fit_kmeans++"], ref)


def test_unbatched_points(ranks):
    ref = imgmw.fit_gmm(PROBLEMS["d3"]["x"][1], 3, n_iter=10, generator=torch.Generator().manual_seed(6)).gmm
    for res in ranks:
        _close(res["unbatched"], ref)


@pytest.mark.parametrize("mode", ["unrolled", "one_step"])
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_gradient_of_the_sum_of_rank_losses(ranks, name, mode):
    """Rank r's loss is c_r·f(gmm): each rank's points receive their slice of ∇_x (Σ_r c_r)·f."""
    p = PROBLEMS[name]
    x = p["x"].clone().requires_grad_(True)
    fit = imgmw.fit_gmm(x, 4, n_iter=6, init=cases.start_gmm(p["x"]), grad=mode)
    (sum(cases.GRAD_SCALES) * cases.grad_loss(fit.gmm)).backward()
    for r, res in enumerate(ranks):
        torch.testing.assert_close(res[f"{name}/grad_{mode}"], cases.shard(x.grad, r), rtol=1e-9, atol=1e-10)


def test_warm_start_em_over_shards(ranks):
    x = PROBLEMS["d3"]["x"]
    em = imgmw.WarmStartEM(4, generator=torch.Generator().manual_seed(9), policy=imgmw.FitPolicy(check_every=2))
    ref = [em(x + 0.05 * t).detach() for t in range(5)]
    for res in ranks:
        for got, want in zip(res["warm"], ref):
            _close(got, want, 1e-9)


def test_mw2_loss_over_shards(ranks):
    x = PROBLEMS["d3"]["x"].clone().requires_grad_(True)
    loss_fn = imgmw.MW2Loss(cases.start_gmm(x.detach()), generator=torch.Generator().manual_seed(11))
    values = []
    for _ in range(3):
        value = loss_fn(x)
        (sum(cases.GRAD_SCALES) * value).backward()
        values.append(value.detach())
    for r, res in enumerate(ranks):
        got, grad = res["mw2loss"]
        torch.testing.assert_close(got, torch.stack(values), rtol=0, atol=1e-9)
        # every rank backpropagates its own loss once per call: Σ_r loss_r = 2·value, here weighted 1 + 2.5
        torch.testing.assert_close(grad * sum(cases.GRAD_SCALES) / cases.WORLD_SIZE, cases.shard(x.grad, r),
                                   rtol=1e-7, atol=1e-9)


def test_semidual_duals_count_every_rank_patches(ranks):
    """Under a process group the ψ ascent shares out the patches of all ranks: every rank ends with the duals of
    one ascent whose counts are those of the two images' patches together (each step and level:
    ψ += lr·(1/J − share)), not the duals of its own image alone."""
    from imgmw.patches import extract_patches, gaussian_pyramid

    ot = cases.semidual_ot()
    levels = [gaussian_pyramid(img, ot.n_scales) for img in cases.semidual_images()[1]]

    def ascend(images: list[list[torch.Tensor]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        psi = [p.clone() for p in ot.psi]
        avg = [torch.zeros_like(p) for p in psi]
        for _ in range(ot.psi_steps):
            for s in range(ot.n_scales):
                idx = torch.cat([ot.assign(s, extract_patches(lv[s], ot.patches[s])[0], psi[s]) for lv in images])
                share = torch.bincount(idx, minlength=psi[s].numel()).to(psi[s]) / idx.numel()
                psi[s] += ot.psi_lr * (1.0 / psi[s].numel() - share)
                avg[s] += psi[s] / ot.psi_steps
        return psi, avg

    want_psi, want_avg = ascend(levels)
    alone, _ = ascend(levels[:1])
    assert max(float((a - b).abs().max()) for a, b in zip(alone, want_psi)) > 1e-3
    for res in ranks:
        got_psi, got_avg = res["semidual"]
        for got, want in zip(got_psi + got_avg, want_psi + want_avg):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case, words", [("dimension", "ranks disagree"), ("implicit", "grad='implicit'"),
                                         ("random", "init='random'"), ("init", "init GMM differs"),
                                         ("count", "exceeds the number of valid points")])
def test_bad_distributed_calls_raise_on_every_rank(ranks, case, words):
    for res in ranks:
        assert words in res[f"error/{case}"]


def test_process_group_without_init_is_a_clear_error():
    with pytest.raises(ValueError, match="not initialised"):
        imgmw.fit_gmm(torch.randn(50, 2), 2, process_group="world")


def test_shard_range_covers_every_index_once():
    from imgmw.distributed import shard_range

    for n in (0, 1, 5, 11):
        for world in (1, 2, 3, 7):
            blocks = [shard_range(n, r, world) for r in range(world)]
            assert [i for b in blocks for i in b] == list(range(n))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def _fit_prior(out: Path, nproc: int, folder: Path) -> dict:
    args = ["-m", "apps.fit_prior", str(folder), "--k", "6", "--patch", "4", "--scales", "2", "--per-image", "300",
            "--held-out", "50", "--iters", "15", "--tol", "0", "--output", str(out), "--quiet", "--device", "cpu"]
    cmd = [sys.executable, *args] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_fit_prior_same_with_one_and_two_processes(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("wood.png", "brick.png", "gravel.png"):  # three images: unequal shards over two ranks
        (folder / name).write_bytes((ROOT / "data" / name).read_bytes())
    one = _fit_prior(tmp_path / "one", 1, folder)
    two = _fit_prior(tmp_path / "two", 2, folder)
    assert one["n_processes"] == 1 and two["n_processes"] == 2
    assert one["n_images"] == two["n_images"] == 3 and one["n_patches"] == two["n_patches"] == 3 * 300 * 2
    assert two["mean_log_likelihood"] == pytest.approx(one["mean_log_likelihood"], rel=1e-4)
    p1 = torch.load(tmp_path / "one" / "prior.pt")
    p2 = torch.load(tmp_path / "two" / "prior.pt")
    from imgmw.prior import prior_from_dict

    gmm = prior_from_dict(p2)
    assert gmm.batch_shape == (2,) and gmm.n_components == 6 and gmm.n_features == 48
    torch.testing.assert_close(p2["means"], p1["means"], rtol=0, atol=1e-4)
    assert (tmp_path / "two" / "components.png").stat().st_size > 0


def _torchrun(module_args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *module_args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.mark.slow
def test_train_generator_under_torchrun_with_ddp_and_resume(tmp_path):
    out = tmp_path / "digits"
    common = ["-m", "apps.train_generator", "--data", "digits", "--target", "data", "--batch", "128", "--k", "3",
              "--hidden", "16", "--eval-samples", "100", "--output", str(out), "--quiet", "--device", "cpu"]
    proc = _torchrun([*common, "--iters", "4", "--save-every", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads((out / "metrics.json").read_text())
    assert first["processes"] == 2 and first["steps"] == 4
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert len(state["rng_per_rank"]) == 2 and not torch.equal(*state["rng_per_rank"])  # each rank its own codes
    proc = _torchrun([*common, "--iters", "6", "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["steps"] == 6 and resumed["resumed_from_step"] == 4
    proc = _torchrun([*common, "--iters", "8", "--resume"], nproc=3)
    assert proc.returncode != 0 and "resume it with as many" in proc.stderr
    texture = tmp_path / "texture"
    proc = _torchrun(["-m", "apps.train_generator", "--data", "texture", "--size", "48", "--iters", "2", "--output",
                      str(texture), "--quiet", "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((texture / "metrics.json").read_text())["processes"] == 2
