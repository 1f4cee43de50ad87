"""Benchmark imgmw's MW2² (forward + backward) against POT's ``ot.gmm.gmm_ot_loss`` on the torch backend.

Both sides compute the squared Mixture-Wasserstein distance between two random GMMs and its gradient
with respect to the means and covariances of both mixtures (weights fixed), in float64, on the same
inputs. Cases: (K, D) in {(10, 3), (4, 48), (4, 192), (50, 48)}, and a batch of 64 problems with
(K, D) = (10, 3), which imgmw solves in one batched call and POT in a Python loop.

Timings are the best of ``--repeat`` interleaved runs, in process CPU time by default (``--clock wall``
for elapsed time): the machine is shared, and CPU time of a one-thread process (``--threads``) is far less
sensitive to other jobs. The last columns are the largest |imgmw − POT| differences of the values and of
the gradients.

Two extra rows time the first two cases with ``mw2(..., check_input=False)`` (no input validation), labelled
"unchecked"; they are not part of the headline ratios, which time ``mw2`` with its default arguments.

A last row times the texture loss's case, S = 4 pyramid scales of 4×4×3 patches (K=4, D=48, float32): four
calls of imgmw's MW2 (one per scale) against one batched call over the scales (one linear-program transfer
instead of four).

Usage: PYTHONPATH=. python benchmarks/bench_mw2.py [--repeat 5] [--threads 1] [--device auto|cpu|cuda]
(POT runs on the CPU; on a GPU the imgmw column is the GPU's, with ``--clock wall``.)
"""
from __future__ import annotations

import sys

from _threads import pin_thread_pools  # the benchmarks folder is the script's own

pin_thread_pools(sys.argv[1:])  # before NumPy, SciPy (POT) and torch start their pools

import argparse  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402


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


def random_params(batch: int, k: int, d: int, seed: int, device: str = "cpu", dtype_name: str = "float64"):
    """Weights, means and SPD covariances ``(w [B,K], m [B,K,D], C [B,K,D,D])`` (float64 by default)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    w = torch.rand(batch, k, generator=g, dtype=torch.float64) + 0.1
    m = torch.randn(batch, k, d, generator=g, dtype=torch.float64)
    a = torch.randn(batch, k, d, d, generator=g, dtype=torch.float64) / d**0.5
    c = a @ a.mT + 0.1 * torch.eye(d, dtype=torch.float64)
    dtype = getattr(torch, dtype_name)
    return tuple(t.to(device, dtype) for t in (w / w.sum(-1, keepdim=True), m, c))


def imgmw_run(src, tgt, check_input: bool = True):
    """Forward + backward of imgmw's batched MW2² (``mw2``'s default arguments unless ``check_input=False``);
    returns (values [B], gradients)."""
    from imgmw import GMM, mw2

    leaves = [t.clone().requires_grad_() for t in (src[1], src[2], tgt[1], tgt[2])]
    value = mw2(GMM(src[0], leaves[0], leaves[1]), GMM(tgt[0], leaves[2], leaves[3]), check_input=check_input)
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


def run_case(name: str, batch: int, k: int, d: int, repeat: int, clock, device: str,
             check_input: bool = True) -> tuple[str, float]:
    src, tgt = random_params(batch, k, d, 0), random_params(batch, k, d, 1)
    src_dev, tgt_dev = random_params(batch, k, d, 0, device), random_params(batch, k, d, 1, device)
    ours, ours_grad = imgmw_run(src_dev, tgt_dev, check_input)
    ref, ref_grad = pot_run(src, tgt)
    value_diff = float((ours.cpu() - ref).abs().max())
    grad_diff = max(float((a.cpu() - b).abs().max()) for a, b in zip(ours_grad, ref_grad))
    t_ours, t_ref = best_of_interleaved([lambda: imgmw_run(src_dev, tgt_dev, check_input), lambda: pot_run(src, tgt)],
                                        repeat, clock)
    row = (f"{name:<22} {t_ours * 1e3:>10.2f} {t_ref * 1e3:>10.2f} {t_ref / t_ours:>8.1f}x "
           f"{value_diff:>11.1e} {grad_diff:>10.1e}")
    return row, t_ref / t_ours


def texture_scales_case(repeat: int, clock, device: str, n_scales: int = 4) -> str:
    """S per-scale MW2 calls against one call batched over the scales (K=4, D=48, float32, fwd + bwd)."""
    import torch

    from imgmw import GMM, mw2

    src = random_params(n_scales, 4, 48, 2, device, "float32")
    tgt = random_params(n_scales, 4, 48, 3, device, "float32")

    def per_scale():
        means = src[1].clone().requires_grad_()
        total = sum(mw2(GMM(src[0][s], means[s], src[2][s]), GMM(tgt[0][s], tgt[1][s], tgt[2][s]), check_input=False)
                    for s in range(n_scales))
        total.backward()
        return means.grad

    def batched():
        means = src[1].clone().requires_grad_()
        mw2(GMM(src[0], means, src[2]), GMM(*tgt), check_input=False).sum().backward()
        return means.grad

    torch.testing.assert_close(batched(), per_scale())
    t_loop, t_batch = best_of_interleaved([per_scale, batched], repeat, clock)
    return (f"texture loss, S={n_scales} scales of (K=4, D=48) float32: {n_scales} calls {t_loop * 1e3:.2f} ms, one "
            f"batched call {t_batch * 1e3:.2f} ms: {t_loop / t_batch:.2f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="timing runs per case (best is kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: process CPU time (robust on a shared machine; torch runs one thread by "
                             "default); wall: elapsed time")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="device of imgmw's side (auto: cuda when available)")
    args = parser.parse_args(argv)

    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device

    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    warnings.filterwarnings("ignore", category=UserWarning)
    cases = [("K=10 D=3", 1, 10, 3), ("K=4 D=48", 1, 4, 48), ("K=4 D=192", 1, 4, 192),
             ("K=50 D=48", 1, 50, 48), ("B=64 x (K=10 D=3)", 64, 10, 3)]
    print(f"MW2² forward+backward (grads w.r.t. means and covariances), float64, imgmw on {device}, "
          f"{args.threads} thread(s), best of {args.repeat}, {args.clock} clock")
    print(f"{'case':<22} {'imgmw ms':>10} {'POT ms':>10} {'ratio':>9} {'|Δ value|':>11} {'|Δ grad|':>10}")
    ratios = []
    for name, batch, k, d in cases:
        row, ratio = run_case(name, batch, k, d, args.repeat, clock, device)
        print(row)
        ratios.append((name, ratio))
    for name, ratio in ratios:
        print(f"{name}: speedup vs POT: {ratio:.1f}x")
    print("extra rows, mw2(..., check_input=False) (no input validation; not the headline):")
    for name, batch, k, d in cases[:2]:
        print(run_case(f"{name} unchecked", batch, k, d, args.repeat, clock, device, check_input=False)[0])
    print(texture_scales_case(args.repeat, clock, device))


if __name__ == "__main__":
    main()
