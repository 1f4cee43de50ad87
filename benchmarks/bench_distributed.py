"""Distributed EM: time per EM step and bytes on the wire against the number of processes, and the memory of
a 1M-patch prior fit.

1. Steps (default): a patch fit (N=200000 points, D=48, K=16, float32) split over W = 1 and 2 gloo processes
   of one thread each on this machine; every process times one EM step (:func:`imgmw.mstep.em_map` with the
   group: local E-step and statistics, one all-reduce, the M-step) best of REPEATS, between barriers. The
   bytes each step all-reduces are counted by wrapping ``torch.distributed.all_reduce`` and compared with the
   formula ``B·(K(1 + D + D²) + 2)`` floats; the same formula is printed for 64 GPUs at the prior's size
   (D=192, K=64), where a ring all-reduce sends about twice that per rank per step whatever W.
2. ``--prior``: ``apps.fit_prior`` on 1,000,000 8×8 colour patches (D=192) from the images in data/ (with
   replacement), K=64, ``--iters 2``, under ``torch.distributed.run`` with W processes (default 2); prints
   the wall time, the seconds per EM step and each process's peak resident memory against the stated bound
   (the largest shard's points and log-responsibilities, N_rank·(D+K)·4 bytes, + 256 MiB of temporaries +
   0.6 GB of interpreter and libraries). The live tensors stay within it; with glibc's default allocator the
   resident size grows beyond it, because the E-step's per-chunk temporaries (a few MiB each) are served from
   the heap once glibc's dynamic mmap threshold has risen, and the heap keeps their pages. ``--mmap-threshold
   1048576`` fixes the threshold and shows the bound met, at about twice the fit time (fresh pages are
   touched for every chunk); reusing the chunk buffers is the lasting fix (the performance issue).

Usage: PYTHONPATH=. python benchmarks/bench_distributed.py [--quick] [--prior [--nproc W]]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
REPEATS = 5
TEMPORARY_BYTES = 256 << 20  # EM chunk temporaries, the image being read, the held-out patches
LIBRARY_BYTES = 600 << 20  # resident size of an interpreter with torch, kornia and torchvision (measured ~0.5 GB)


def _points(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(16, d, generator=g)
    mixing = torch.randn(d, d, generator=g) / d ** 0.5
    labels = torch.randint(16, (n,), generator=g)
    return (centres[labels] + torch.randn(n, d, generator=g) @ mixing).float()


def _step_worker(rank: int, world: int, port: int, n: int, d: int, k: int, out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from imgmw.distributed import WORLD, check_process_group, shard_range
    from imgmw.init import init_gmm
    from imgmw.mstep import em_map

    group = check_process_group(WORLD) if world > 1 else None
    mine = shard_range(n, rank, world)
    x = _points(n, d, 0)[mine.start:mine.stop]
    gmm = init_gmm(x, k, "kmeans++", generator=torch.Generator().manual_seed(1), process_group=group)
    sent = []
    real = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        sent.append(tensor.numel() * tensor.element_size())
        return real(tensor, *args, **kwargs)

    times = []
    for i in range(REPEATS + 1):
        if group is not None:
            dist.barrier(group)
        dist.all_reduce, sent[:] = counting, []
        t0 = time.perf_counter()
        new, _ = em_map(gmm, x, None, 1e-4, False, None, None, group)
        times.append(time.perf_counter() - t0)
        dist.all_reduce = real
        gmm = new if i == 0 else gmm  # time the same step from the second call on
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": min(times[1:]), "bytes": sum(sent)}))
    if group is not None:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def steps(n: int, d: int, k: int) -> None:
    rows = []
    for world in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "step.json")
            mp.spawn(_step_worker, args=(world, _free_port(), n, d, k, out), nprocs=world)
            rows.append((world, json.loads(Path(out).read_text())))
    formula = 4 * (k * (1 + d + d * d) + 2)
    print(f"EM step, N={n}, D={d}, K={k}, float32, one thread per process (best of {REPEATS}):")
    print(f"{'processes':>10} {'s/step':>9} {'speed-up':>9} {'all-reduced bytes':>18} {'formula':>9}")
    base = rows[0][1]["seconds"]
    for world, r in rows:
        shown = formula if world > 1 else 0
        print(f"{world:>10} {r['seconds']:>9.4f} {base / r['seconds']:>8.2f}x {r['bytes']:>18} {shown:>9}")
    big = 4 * (64 * (1 + 192 + 192 ** 2) + 2)
    print(f"64 GPUs, D=192, K=64: K(1+D+D²)+2 = {big // 4} floats = {big / 2**20:.1f} MiB all-reduced per EM step "
          f"(ring all-reduce: ~{2 * 63 / 64 * big / 2**20:.1f} MiB sent per GPU per step, independent of N)")


def prior(nproc: int, mmap_threshold: int | None) -> None:
    n_patches, k, d, images = 1_000_000, 64, 192, len(list((ROOT / "data").glob("*.[pj][np]g")))
    per_image = -(-n_patches // images)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "apps.fit_prior", str(ROOT / "data"), "--patch", "8", "--k", str(k), "--per-image",
               str(per_image), "--held-out", "100", "--iters", "2", "--tol", "0", "--device", "cpu",
               "--output", tmp, "--quiet"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
        if mmap_threshold is not None:  # glibc: blocks above this size are mmapped and returned on free
            env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        wall = time.perf_counter() - t0
        metrics = json.loads((Path(tmp) / "metrics.json").read_text())
    n = metrics["n_patches"]
    n_rank = -(-images // nproc) * per_image  # the largest shard: whole images per rank
    bound = n_rank * (d + k) * 4 + TEMPORARY_BYTES + LIBRARY_BYTES
    peak = metrics["peak_rss_bytes"]
    print(f"prior: {n} patches (D={d}), K={k}, {nproc} processes: {wall:.0f} s in all, reading "
          f"{metrics['seconds_reading']:.0f} s, init + 2 EM steps {metrics['seconds_fitting']:.0f} s")
    print(f"peak resident memory of the largest process: {peak / 2**30:.2f} GiB; stated bound "
          f"N_rank·(D+K)·4 B (N_rank = {n_rank}, the largest shard) + 256 MiB temporaries + 0.6 GB libraries = "
          f"{bound / 2**30:.2f} GiB: "
          f"{'met' if peak <= bound else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller step problem (N=50000)")
    parser.add_argument("--prior", action="store_true", help="also fit the 1M-patch prior and report its memory")
    parser.add_argument("--nproc", type=int, default=2, help="processes of the --prior run (default 2)")
    parser.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="--prior: run with glibc's MALLOC_MMAP_THRESHOLD_ fixed at BYTES (e.g. 1048576)")
    args = parser.parse_args()
    steps(50_000 if args.quick else 200_000, 48, 16)
    if args.prior:
        prior(args.nproc, args.mmap_threshold)


if __name__ == "__main__":
    main()
