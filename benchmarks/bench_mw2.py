"""Benchmark imgmw's MW2² (forward + backward) against POT's ``ot.gmm.gmm_ot_loss`` on the torch backend.

Both sides compute the squared Mixture-Wasserstein distance between two random GMMs and its gradient
with respect to the means and covariances of both mixtures (weights fixed), in float64, on the same
inputs. Cases: (K, D) in {(10, 3), (4, 48), (4, 192), (50, 48)}, and a batch of 64 problems with
(K, D) = (10, 3), which imgmw solves in one batched call and POT in a Python loop.

Timings are the best of ``--repeat`` interleaved runs, in process CPU time by default (``--clock wall``
for elapsed time): the machine is shared, and CPU time of a one-thread process (``--threads``) is far less
sensitive to other jobs. The last columns are the largest |imgmw − POT| differences of the values and of
the gradients.

Usage: PYTHONPATH=. python benchmarks/bench_mw2.py [--repeat 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import time
import warnings


def best_of_interleaved(fns, repeat: int, clock) -> list[float]:
    """Best time of each function over ``repeat`` rounds, alternating the functions within a round so
    that both sides see the same machine load."""
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = clock()
            fn()
            best[i] = min(best[i], clock() - t0)
    return best


def random_params(batch: int, k: int, d: int, seed: int):
    """Weights, means and SPD covariances ``(w [B,K], m [B,K,D], C [B,K,D,D])`` in float64."""
    import torch

    g = torch.Generator().manual_seed(seed)
    w = torch.rand(batch, k, generator=g, dtype=torch.float64) + 0.1
    m = torch.randn(batch, k, d, generator=g, dtype=torch.float64)
    a = torch.randn(batch, k, d, d, generator=g, dtype=torch.float64) / d**0.5
    c = a @ a.mT + 0.1 * torch.eye(d, dtype=torch.float64)
    return w / w.sum(-1, keepdim=True), m, c


def imgmw_run(src, tgt):
    """Forward + backward of imgmw's batched MW2²; returns (values [B], gradients)."""
    from imgmw import GMM, mw2

    leaves = [t.clone().requires_grad_() for t in (src[1], src[2], tgt[1], tgt[2])]
    value = mw2(GMM(src[0], leaves[0], leaves[1]), GMM(tgt[0], leaves[2], leaves[3]))
    value.sum().backward()
    return value.detach(), [t.grad for t in leaves]


def pot_run(src, tgt):
    """Forward + backward of POT's gmm_ot_loss on the torch backend, looping over the batch."""
    import torch
    from ot.gmm import gmm_ot_loss

    leaves = [t.clone().requires_grad_() for t in (src[1], src[2], tgt[1], tgt[2])]
    values = []
    for i in range(src[0].shape[0]):
        value = gmm_ot_loss(leaves[0][i], leaves[2][i], leaves[1][i], leaves[3][i], src[0][i], tgt[0][i])
        value.backward()
        values.append(value.detach())
    return torch.stack(values), [t.grad for t in leaves]


def run_case(name: str, batch: int, k: int, d: int, repeat: int, clock) -> tuple[str, float]:
    src, tgt = random_params(batch, k, d, 0), random_params(batch, k, d, 1)
    ours, ours_grad = imgmw_run(src, tgt)
    ref, ref_grad = pot_run(src, tgt)
    value_diff = float((ours - ref).abs().max())
    grad_diff = max(float((a - b).abs().max()) for a, b in zip(ours_grad, ref_grad))
    t_ours, t_ref = best_of_interleaved([lambda: imgmw_run(src, tgt), lambda: pot_run(src, tgt)], repeat, clock)
    row = (f"{name:<22} {t_ours * 1e3:>10.2f} {t_ref * 1e3:>10.2f} {t_ref / t_ours:>8.1f}x "
           f"{value_diff:>11.1e} {grad_diff:>10.1e}")
    return row, t_ref / t_ours


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timing runs per case (best is kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: process CPU time (robust on a shared machine; torch runs one thread by "
                             "default); wall: elapsed time")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    warnings.filterwarnings("ignore", category=UserWarning)
    cases = [("K=10 D=3", 1, 10, 3), ("K=4 D=48", 1, 4, 48), ("K=4 D=192", 1, 4, 192),
             ("K=50 D=48", 1, 50, 48), ("B=64 x (K=10 D=3)", 64, 10, 3)]
    print(f"MW2² forward+backward (grads w.r.t. means and covariances), float64, {args.threads} thread(s), "
          f"best of {args.repeat}, {args.clock} clock")
    print(f"{'case':<22} {'imgmw ms':>10} {'POT ms':>10} {'ratio':>9} {'|Δ value|':>11} {'|Δ grad|':>10}")
    ratios = []
    for name, batch, k, d in cases:
        row, ratio = run_case(name, batch, k, d, args.repeat, clock)
        print(row)
        ratios.append((name, ratio))
    for name, ratio in ratios:
        print(f"{name}: speedup vs POT: {ratio:.1f}x")


if __name__ == "__main__":
    main()
