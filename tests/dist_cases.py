"""Two-process runs of the distributed EM for tests/test_distributed.py (real gloo processes on 127.0.0.1).

    python tests/dist_cases.py OUT_DIR

Spawns two ranks that each run every case on their shard of the problems built by :func:`problems` and save
what they computed to ``OUT_DIR/rank{r}.pt``; the tests compare those with one-process computations on the
concatenated data. Rank 0 holds the first ``CUT`` points of every problem (unequal shards).
"""
from __future__ import annotations

import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2
CUT = 130  # rank 0's share of the N = 500 points; rank 1 takes the other 370
N_POINTS = 500
GRAD_SCALES = (1.0, 2.5)  # rank r's loss is GRAD_SCALES[r] · f(gmm)


def problems() -> dict[str, dict[str, torch.Tensor]]:
    """The full (unsharded) data of each case, float64, batch of 2 mixtures."""
    g = torch.Generator().manual_seed(1234)
    out = {}
    for d in (3, 8):  # the quadratic-feature kernel (D <= 6) and the whitened one
        centres = 3 * torch.randn(2, 4, d, generator=g, dtype=torch.float64)
        labels = torch.randint(4, (2, N_POINTS), generator=g)
        x = centres.gather(1, labels.unsqueeze(-1).expand(2, N_POINTS, d)) + torch.randn(2, N_POINTS, d, generator=g,
                                                                                        dtype=torch.float64)
        mask = torch.rand(2, N_POINTS, generator=g) > 0.2
        weight = torch.rand(2, N_POINTS, generator=g, dtype=torch.float64) * 2
        out[f"d{d}"] = {"x": x, "mask": mask, "weight": weight}
    return out


def semidual_images() -> tuple[torch.Tensor, list[torch.Tensor]]:
    """An exemplar ``[3, 32, 32]`` and one synthesis ``[1, 3, 24, 24]`` per rank for the semi-dual duals."""
    g = torch.Generator().manual_seed(77)
    exemplar = torch.rand(3, 32, 32, generator=g)
    return exemplar, [torch.rand(1, 3, 24, 24, generator=g) for _ in range(WORLD_SIZE)]


def semidual_ot(process_group=None):
    """The semi-dual state of the distributed case: 2 levels, 150 targets, 3 ascent steps over all patches."""
    from imgmw.texture_semidual import SemiDualPatchOT

    return SemiDualPatchOT(semidual_images()[0], torch.Generator().manual_seed(13), n_scales=2, n_targets=150,
                           psi_steps=3, psi_batch=10**6, process_group=process_group)


def start_gmm(x: torch.Tensor, k: int = 4):
    """A fixed starting GMM, computed identically on every process from the full data."""
    from imgmw.init import init_gmm

    return init_gmm(x, k, "random_from_data", generator=torch.Generator().manual_seed(7))


def grad_loss(gmm) -> torch.Tensor:
    """The scalar whose gradient the unrolled and one-step cases compare."""
    return gmm.means.square().sum() + gmm.covariances.sum() + (gmm.weights.log() * gmm.weights).sum()


def shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[:, :CUT] if rank == 0 else t[:, CUT:]


def _error(fn) -> str:
    try:
        fn()
    except ValueError as err:
        return str(err)
    return ""


def run_cases(rank: int) -> dict:
    import imgmw
    from imgmw.distributed import WORLD
    from imgmw.init import init_gmm

    res: dict = {}
    for name, p in problems().items():
        x, mask, weight = (shard(p[key], rank) for key in ("x", "mask", "weight"))
        init = start_gmm(p["x"])
        fit = imgmw.fit_gmm(x, 4, n_iter=200, tol=1e-9, init=init, process_group=WORLD)
        res[f"{name}/fit"] = (fit.gmm, fit.lower_bound, fit.n_iter, fit.converged, fit.log_resp)
        fit = imgmw.fit_gmm(x, 4, n_iter=40, init=init, mask=mask, sample_weight=weight, process_group=WORLD)
        res[f"{name}/masked"] = (fit.gmm, fit.lower_bound)
        res[f"{name}/kmeans++"] = init_gmm(x, 4, "kmeans++", sample_weight=weight,
                                           generator=torch.Generator().manual_seed(3), process_group=WORLD)
        res[f"{name}/kmeans"] = init_gmm(x, 4, "kmeans", generator=torch.Generator().manual_seed(4),
                                         process_group=WORLD)
        res[f"{name}/fit_kmeans++"] = imgmw.fit_gmm(x, 4, n_iter=20, generator=torch.Generator().manual_seed(5),
                                                    process_group=WORLD).gmm
        for mode in ("unrolled", "one_step"):
            xr = x.clone().requires_grad_(True)
            fit = imgmw.fit_gmm(xr, 4, n_iter=6, init=init, grad=mode, process_group=WORLD)
            (GRAD_SCALES[rank] * grad_loss(fit.gmm)).backward()
            res[f"{name}/grad_{mode}"] = xr.grad
    p = problems()["d3"]
    x = shard(p["x"], rank)
    res["unbatched"] = imgmw.fit_gmm(x[1], 3, n_iter=10, generator=torch.Generator().manual_seed(6),
                                     process_group=WORLD).gmm
    em = imgmw.WarmStartEM(4, generator=torch.Generator().manual_seed(9), policy=imgmw.FitPolicy(check_every=2),
                           process_group=WORLD)
    res["warm"] = [em(x + 0.05 * t).detach() for t in range(5)]
    target = start_gmm(p["x"])
    loss_fn = imgmw.MW2Loss(target, generator=torch.Generator().manual_seed(11), process_group=WORLD)
    xr = x.clone().requires_grad_(True)
    values = []
    for _ in range(3):
        value = loss_fn(xr)
        value.backward()
        values.append(value.detach())
    res["mw2loss"] = (torch.stack(values), xr.grad)
    from imgmw.patches import gaussian_pyramid

    ot = semidual_ot(WORLD)
    ot.ascend_psi(gaussian_pyramid(semidual_images()[1][rank], ot.n_scales))
    res["semidual"] = (ot.psi, ot.psi_avg)
    res["error/dimension"] = _error(lambda: imgmw.fit_gmm(x[..., :2 + rank], 2, process_group=WORLD))
    res["error/implicit"] = _error(lambda: imgmw.fit_gmm(x, 2, grad="implicit", process_group=WORLD))
    res["error/random"] = _error(lambda: imgmw.fit_gmm(x, 2, init="random", process_group=WORLD))
    other = start_gmm(p["x"] + rank)
    res["error/init"] = _error(lambda: imgmw.fit_gmm(x, 4, init=other, process_group=WORLD))
    few = torch.zeros(x.shape[:-1], dtype=torch.bool)
    few[:, 0] = True  # one valid point per rank: 2 in all, fewer than K = 4
    res["error/count"] = _error(lambda: imgmw.fit_gmm(x, 4, mask=few, process_group=WORLD))
    return res


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.save(run_cases(rank), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    mp.spawn(_worker, args=(free_port(), sys.argv[1]), nprocs=WORLD_SIZE)
