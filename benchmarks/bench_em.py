"""Benchmark imgmw's batched EM against scikit-learn's GaussianMixture, in one run.

Cases:
1. B=256 independent colour fits (N=4096, D=3, K=10, 20 EM iterations, float32) vs sklearn looping over the
   B problems. Both sides include their initialisation (k-means++ seeding for imgmw, sklearn's default k-means).
2. One patch fit (N=60000, D=48, K=8, 20 iterations) vs sklearn, float32 and float64, plus the achieved
   GFLOP/s of imgmw's EM as a fraction of a same-run float32 GEMM of similar shape.
3. Peak memory (resident-set growth) of a 10-million-point D=3 fit, measured in a subprocess.
4. (issue 18) 32 small fits (N=2048, D=3, K=10, 20 EM steps, float32), both sides initialised by
   ``"random_from_data"``, vs a loop of ``GaussianMixture(10, init_params="random_from_data", max_iter=20, tol=0)``.
5. (issue 18) One patch fit (N=30000, D=48, K=8, 20 steps, float32), both sides from the SAME initial parameters
   (``weights_init``, ``means_init``, ``precisions_init``, ``tol=0``), vs scikit-learn on torch tensors through
   the array API (``SCIPY_ARRAY_API=1``, ``array_api_dispatch=True``) and vs scikit-learn on NumPy; GFLOP/s
   (``4·K·N·D²`` per step) against a same-run GEMM of the per-component E-step's shape and a square GEMM.

Cases 4 and 5 time both sides interleaved (min of ``--repeats``, each timed run right after an untimed one; CPU
time at one thread, synchronised wall time on a GPU or with more threads) and print point·component·iterations/s
next to published GPU figures.

Usage: PYTHONPATH=. python benchmarks/bench_em.py [--quick] [--cases 4,5] [--threads 1] [--device auto|cpu|cuda]
[--repeats 3] [--json F]  (``--cases``: run only the listed cases, by number; default all)
"""
from __future__ import annotations

import os
import sys

from _threads import pin_thread_pools  # noqa: E402  (the benchmarks folder is the script's own)

pin_thread_pools(sys.argv[1:])
os.environ.setdefault("SCIPY_ARRAY_API", "1")  # before SciPy/scikit-learn are imported: array-API dispatch

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

# Published GPU throughputs of fused E-steps, in point·component·iterations per second (reference lines only).
GPU_ANCHORS = (("Flash-GMM fused E-step, A100, spherical covariances", 6.7e9),
               ("torchgmm, GPU, diagonal covariances", 8e8))


def make_clock(device, threads: int):
    """CPU time at one thread (immune to other processes' load); synchronised wall time on a GPU or when
    several threads run (CPU time would add the threads up)."""
    import torch

    if device.type == "cuda":
        def clock() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return clock
    return time.process_time if threads == 1 else time.perf_counter


def interleaved(fns: dict, repeats: int, clock) -> dict:
    """Minimum time of each function over ``repeats`` rounds, the functions taking turns within a round.

    Each function runs once untimed right before its timed run: without that, the first run after another
    side's turn pays for the caches that turn evicted (measured: an imgmw fit of case 4 took 2× longer right
    after scikit-learn's loop than on its second run), so the order of the turns would decide the ratio."""
    best = {name: math.inf for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            fn()
            t0 = clock()
            fn()
            best[name] = min(best[name], clock() - t0)
    return best


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def colour_data(b: int, n: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    # clustered colours in [0, 1]^3: 10 blobs of random spread per problem
    centres = torch.rand(b, 10, 3, generator=g)
    labels = torch.randint(0, 10, (b, n), generator=g)
    spread = 0.02 + 0.08 * torch.rand(b, 10, 1, generator=g)
    x = torch.take_along_dim(centres, labels[..., None], 1) + torch.randn(b, n, 3, generator=g) * \
        torch.take_along_dim(spread, labels[..., None], 1)
    return x.clamp(0, 1)


def patch_data(n: int, d: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    centres = torch.randn(8, d, generator=g)
    labels = torch.randint(0, 8, (n,), generator=g)
    return centres[labels] + torch.randn(n, d, generator=g) @ mix


def sklearn_fit(x, k: int, n_iter: int, **kwargs):
    from sklearn.mixture import GaussianMixture

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        GaussianMixture(k, max_iter=n_iter, tol=0.0, random_state=kwargs.pop("random_state", 0), **kwargs).fit(x)


def gemm_reference(rows: int, d: int, device, block: int = 8192):
    """A same-run float32 GEMM ``[rows, d] @ [d, d]`` (the shape of a per-component E-step) as ``(fn, flops)``.

    Computed in row blocks of ``block`` into one output block, as the EM kernels work on chunks: one
    ``[rows, d]`` product streams ~100 MB through memory and measures the bandwidth left by other processes
    (half of the core's GEMM rate on a loaded machine), not the rate the core's arithmetic reaches."""
    import torch

    a = torch.randn(block, d, device=device)
    w = torch.randn(d, d, device=device)
    out = torch.empty(block, d, device=device)
    n_blocks = max(1, rows // block)

    def fn():
        for _ in range(n_blocks):
            torch.matmul(a, w, out=out)

    return fn, 2.0 * n_blocks * block * d * d


def case_batched(quick: bool) -> dict:
    import torch

    import imgmw

    b, n, k, it = (32, 4096, 10, 20) if quick else (256, 4096, 10, 20)
    x = colour_data(b, n, 0)
    gen = torch.Generator().manual_seed(0)
    ours = best_of(lambda: imgmw.fit_gmm(x, k, n_iter=it, grad="none", generator=gen), 3)
    xs = x.double().numpy()
    n_ref = 8 if quick else 16
    ref_one = best_of(lambda: [sklearn_fit(xs[i], k, it) for i in range(n_ref)], 1) / n_ref
    ref = ref_one * b
    return {"case": f"B={b} colour fits N={n} D=3 K={k} T={it} float32", "imgmw_s": ours,
            "sklearn_s": ref, "sklearn_note": f"{n_ref} fits timed, scaled to B={b}",
            "speedup": ref / ours}


def case_patch(quick: bool, dtype_name: str) -> dict:
    import torch

    import imgmw

    dtype = getattr(torch, dtype_name)
    n, d, k, it = (15000, 48, 8, 20) if quick else (60000, 48, 8, 20)
    x = patch_data(n, d, 1).to(dtype)
    init = imgmw.fit_gmm(x, k, n_iter=1, grad="none", generator=torch.Generator().manual_seed(0)).gmm
    ours_em = best_of(lambda: imgmw.fit_gmm(x, k, n_iter=it, init=init, grad="none"), 2)
    ours_full = best_of(lambda: imgmw.fit_gmm(x, k, n_iter=it, grad="none",
                                              generator=torch.Generator().manual_seed(0)), 1)
    ref = best_of(lambda: sklearn_fit(x.double().numpy() if dtype_name == "float64" else x.numpy(), k, it), 1)
    # EM flops per iteration: E-step (x−m)P: 2·K·N·D², M-step second moments: 2·K·N·D²
    flops = it * 4.0 * k * n * d * d
    a = torch.randn(k * n, d, dtype=torch.float32)
    w = torch.randn(d, d, dtype=torch.float32)
    out = torch.empty(k * n, d)
    gemm_t = best_of(lambda: torch.matmul(a, w, out=out), 5)
    gemm_gflops = 2.0 * k * n * d * d / gemm_t / 1e9
    return {"case": f"patch fit N={n} D={d} K={k} T={it} {dtype_name}", "imgmw_s": ours_full,
            "imgmw_em_only_s": ours_em, "sklearn_s": ref, "speedup": ref / ours_full,
            "em_gflops": flops / ours_em / 1e9, "gemm_gflops": gemm_gflops,
            "gemm_fraction": flops / ours_em / 1e9 / gemm_gflops}


def case_small_fits(quick: bool, device, clock, repeats: int) -> dict:
    """32 small colour fits, ``random_from_data`` on both sides, vs the scikit-learn loop (issue 18)."""
    import torch

    import imgmw

    b, n, k, it = (8, 2048, 10, 20) if quick else (32, 2048, 10, 20)
    x = colour_data(b, n, 0)
    xd, xs = x.to(device), x.numpy()

    def ours():
        imgmw.fit_gmm(xd, k, n_iter=it, init="random_from_data", grad="none",
                      generator=torch.Generator(device=device).manual_seed(0))

    def reference():
        for i in range(b):
            sklearn_fit(xs[i], k, it, init_params="random_from_data", random_state=i)

    t = interleaved({"imgmw": ours, "sklearn": reference}, repeats, clock)
    pci = b * n * k * it
    return {"case": f"{b} small fits N={n} D=3 K={k} T={it} float32, random_from_data on both sides",
            "imgmw_s": t["imgmw"], "sklearn_s": t["sklearn"], "speedup": t["sklearn"] / t["imgmw"],
            "pci_per_s": pci / t["imgmw"], "sklearn_pci_per_s": pci / t["sklearn"]}


def case_patch_same_init(quick: bool, device, clock, repeats: int) -> dict:
    """One D=48 patch fit from the same initial parameters vs scikit-learn on torch tensors (array API) and on
    NumPy (issue 18)."""
    import sklearn
    import torch

    import imgmw

    n, d, k, it = (8000, 48, 8, 20) if quick else (30000, 48, 8, 20)
    x = patch_data(n, d, 1).float()
    init = imgmw.fit_gmm(x, k, n_iter=1, grad="none", generator=torch.Generator().manual_seed(0)).gmm
    prec = torch.linalg.inv(init.covariances.double())
    prec = (0.5 * (prec + prec.mT)).float()  # scikit-learn checks that the precisions are symmetric
    xd, init_d = x.to(device), init.to(device)
    start = {"weights_init": init.weights.to(device), "means_init": init.means.to(device),
             "precisions_init": prec.to(device)}
    start_np = {key: value.cpu().numpy() for key, value in start.items()}

    def ours():
        imgmw.fit_gmm(xd, k, n_iter=it, init=init_d, grad="none")

    def sklearn_torch():
        with sklearn.config_context(array_api_dispatch=True):
            sklearn_fit(xd, k, it, init_params="random_from_data", **start)

    def sklearn_numpy():
        with sklearn.config_context(array_api_dispatch=False):
            sklearn_fit(x.numpy(), k, it, init_params="random_from_data", **start_np)

    gemm_fn, gemm_flops = gemm_reference(k * n, d, device)
    peak_fn, peak_flops = gemm_reference(1024, 1024, device, block=1024)  # square: the core's GEMM peak
    t = interleaved({"imgmw": ours, "sklearn_torch": sklearn_torch, "sklearn_numpy": sklearn_numpy,
                     "gemm": gemm_fn, "peak": peak_fn}, repeats, clock)
    flops = it * 4.0 * k * n * d * d  # E-step (x − m)P and the second moments: 2·K·N·D² each, per step
    gemm, peak = gemm_flops / t["gemm"] / 1e9, peak_flops / t["peak"] / 1e9
    pci = n * k * it
    return {"case": f"patch fit N={n} D={d} K={k} T={it} float32 from the same initial parameters",
            "imgmw_s": t["imgmw"], "sklearn_torch_s": t["sklearn_torch"], "sklearn_numpy_s": t["sklearn_numpy"],
            "speedup_vs_sklearn_torch": t["sklearn_torch"] / t["imgmw"],
            "speedup_vs_sklearn_numpy": t["sklearn_numpy"] / t["imgmw"],
            "em_gflops": flops / t["imgmw"] / 1e9, "sklearn_torch_gflops": flops / t["sklearn_torch"] / 1e9,
            "gemm_gflops": gemm, "gemm_fraction": flops / t["imgmw"] / 1e9 / gemm, "peak_gemm_gflops": peak,
            "peak_fraction": flops / t["imgmw"] / 1e9 / peak, "pci_per_s": pci / t["imgmw"]}


MEMORY_SCRIPT = r"""
import resource, sys, torch, imgmw
n = int(sys.argv[1])
g = torch.Generator().manual_seed(0)
x = torch.rand(n, 3, generator=g)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
imgmw.fit_gmm(x, 10, n_iter=5, grad="none", generator=g)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(base * 1024, peak * 1024)
"""


def case_memory(quick: bool) -> dict:
    n = 1_000_000 if quick else 10_000_000
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(n)], capture_output=True, text=True,
                         check=True)
    base, peak = map(int, out.stdout.split())
    return {"case": f"memory: fit of N={n:,} points D=3 K=10 float32", "data_mb": n * 3 * 4 / 2**20,
            "peak_rss_mb": peak / 2**20, "growth_mb": (peak - base) / 2**20}


def report(r: dict) -> None:
    print(r["case"])
    if "speedup" in r:
        print(f"  imgmw {r['imgmw_s']:.3f} s   sklearn {r['sklearn_s']:.3f} s   "
              f"speedup vs sklearn: {r['speedup']:.1f}x")
    if "speedup_vs_sklearn_torch" in r:
        print(f"  imgmw {r['imgmw_s']:.3f} s   sklearn on torch (array API) {r['sklearn_torch_s']:.3f} s   "
              f"speedup: {r['speedup_vs_sklearn_torch']:.2f}x")
        print(f"  sklearn on NumPy {r['sklearn_numpy_s']:.3f} s   speedup: {r['speedup_vs_sklearn_numpy']:.2f}x")
    if "gemm_fraction" in r:
        print(f"  EM {r['em_gflops']:.1f} GFLOP/s vs same-run GEMM {r['gemm_gflops']:.1f} GFLOP/s: "
              f"{100 * r['gemm_fraction']:.0f}% of GEMM")
    if "peak_fraction" in r:
        print(f"  (sklearn on torch {r['sklearn_torch_gflops']:.1f} GFLOP/s; square 1024³ GEMM "
              f"{r['peak_gemm_gflops']:.1f} GFLOP/s: EM at {100 * r['peak_fraction']:.0f}% of it)")
    if "pci_per_s" in r:
        print(f"  imgmw {r['pci_per_s']:.3g} point·component·iterations/s")
    if "peak_rss_mb" in r:
        print(f"  peak RSS {r['peak_rss_mb']:.0f} MB (growth during the fit {r['growth_mb']:.0f} MB, "
              f"data {r['data_mb']:.0f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (for a smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (default 1)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="device of imgmw and of scikit-learn's torch tensors in cases 4-5 "
                             "(auto: cuda if available)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of cases 4-5 (minimum kept)")
    parser.add_argument("--cases", default="1,2,3,4,5",
                        help="comma-separated case numbers to run (default all: 1,2,3,4,5)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    try:
        cases = {int(c) for c in args.cases.split(",")}
    except ValueError:
        parser.error(f"--cases takes comma-separated case numbers, got {args.cases!r}")
    if not cases or not cases <= {1, 2, 3, 4, 5}:
        parser.error(f"--cases takes numbers from 1 to 5, got {args.cases!r}")

    import torch
    from threadpoolctl import threadpool_limits

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    torch.set_num_threads(args.threads)
    clock = make_clock(device, args.threads)
    print(f"device {device}, {args.threads} thread(s), {'CPU' if clock is time.process_time else 'wall'} time")
    runs = ((4, lambda: [case_small_fits(args.quick, device, clock, args.repeats)]),
            (5, lambda: [case_patch_same_init(args.quick, device, clock, args.repeats)]),
            (1, lambda: [case_batched(args.quick)]),
            (2, lambda: [case_patch(args.quick, "float32"), case_patch(args.quick, "float64")]),
            (3, lambda: [case_memory(args.quick)]))
    with threadpool_limits(limits=args.threads):
        results = [r for number, run in runs if number in cases for r in run()]
    for r in results:
        report(r)
    print("reference, published GPU figures:")
    for name, rate in GPU_ANCHORS:
        print(f"  {name}: {rate:.2g} point·component·iterations/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
