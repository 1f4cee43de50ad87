"""Benchmark imgmw's batched EM against scikit-learn's GaussianMixture, in one run.

Cases (issue 2):
1. B=256 independent colour fits (N=4096, D=3, K=10, 20 EM iterations, float32) vs sklearn looping over the
   B problems. Both sides include their initialisation (k-means++ seeding for imgmw, sklearn's default k-means).
2. One patch fit (N=60000, D=48, K=8, 20 iterations) vs sklearn, float32 and float64, plus the achieved
   GFLOP/s of imgmw's EM as a fraction of a same-run float32 GEMM of similar shape.
3. Peak memory (resident-set growth) of a 10-million-point D=3 fit, measured in a subprocess.

Usage: PYTHONPATH=. python benchmarks/bench_em.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings


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


def sklearn_fit(x, k: int, n_iter: int):
    from sklearn.mixture import GaussianMixture

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        GaussianMixture(k, max_iter=n_iter, tol=0.0, random_state=0).fit(x)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (for a smoke run)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    results = [case_batched(args.quick), case_patch(args.quick, "float32"), case_patch(args.quick, "float64"),
               case_memory(args.quick)]
    for r in results:
        print(r["case"])
        if "speedup" in r:
            print(f"  imgmw {r['imgmw_s']:.3f} s   sklearn {r['sklearn_s']:.3f} s   speedup vs sklearn: {r['speedup']:.1f}x")
        if "gemm_fraction" in r:
            print(f"  EM {r['em_gflops']:.1f} GFLOP/s vs same-run GEMM {r['gemm_gflops']:.1f} GFLOP/s: "
                  f"{100 * r['gemm_fraction']:.0f}% of GEMM")
        if "peak_rss_mb" in r:
            print(f"  peak RSS {r['peak_rss_mb']:.0f} MB (growth during the fit {r['growth_mb']:.0f} MB, "
                  f"data {r['data_mb']:.0f} MB)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
