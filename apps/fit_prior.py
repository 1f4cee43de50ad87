"""Fit a Gaussian-mixture patch prior to every image under a folder, on one process or many.

    python -m apps.fit_prior FOLDER [--patch 8] [--k 64] [--scales 1] [--seed 0] [--output DIR]
    torchrun --standalone --nproc_per_node N -m apps.fit_prior FOLDER ...

Every image contributes --per-image random p×p colour patches (D = 3p²) per pyramid scale for the fit and
--held-out more for scoring; images are read one at a time. Under torchrun the sorted images are split into
contiguous blocks, one per rank, the EM statistics are all-reduced (gloo on CPU, NCCL on GPU) and every rank
holds the same prior; each image's patches depend only on --seed and its place in the sorted list, so the
result does not depend on the number of processes (imgmw.prior, imgmw.distributed).

Writes (rank 0, atomically) prior.pt (a dict with the GMM's weights [S, K], means [S, K, D] and covariances
[S, K, D, D], plus patch and scales; imgmw.prior.prior_from_dict gives the GMM), components.png (each scale's
components by weight: mean patch | leading eigen-patch) and metrics.json (mean_log_likelihood of the held-out
patches, n_patches, n_images, seconds, peak_rss_bytes, settings).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from collections.abc import Sequence

from apps._cli import (AppError, AppParser, check_output, positive_int, process_group_for, run, seed, settings,
                       staged_output, write_json)

PROG = "fit_prior"
DEFAULT_FOLDER = Path(__file__).resolve().parent.parent / "data"
MAX_PATCH = 16  # D = 3·p² = 768, the practical limit of full covariances


def build_parser() -> argparse.ArgumentParser:
    p = AppParser(prog=f"python -m apps.{PROG}", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", nargs="?", type=Path, default=DEFAULT_FOLDER,
                   help="folder searched recursively for images (default: data/)")
    p.add_argument("--patch", type=positive_int, default=8, help="patch side p (D = 3p²; default 8)")
    p.add_argument("--k", type=positive_int, default=64, help="mixture components per scale (default 64)")
    p.add_argument("--scales", type=positive_int, default=1, help="pyramid scales, one mixture each (default 1)")
    p.add_argument("--per-image", type=positive_int, default=2000,
                   help="training patches per image and scale (default 2000)")
    p.add_argument("--held-out", type=positive_int, default=200,
                   help="held-out patches per image and scale, for mean_log_likelihood (default 200)")
    p.add_argument("--iters", type=positive_int, default=100, help="EM steps at most (default 100)")
    p.add_argument("--tol", type=float, default=1e-4,
                   help="stop when the mean log-likelihood changes by less (default 1e-4; 0: run --iters steps)")
    p.add_argument("--max-side", type=positive_int, default=1024,
                   help="images are downscaled to this longest side first (default 1024)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the patch draws and the k-means++ start")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to compute (auto: cuda if available; under torchrun each rank uses its LOCAL_RANK GPU)")
    p.add_argument("--output", type=Path, default=Path("outputs") / PROG,
                   help=f"output directory (default outputs/{PROG})")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if not args.folder.exists():
        raise AppError(f"folder {args.folder} does not exist")
    if not args.folder.is_dir():
        raise AppError(f"folder {args.folder} is not a directory")
    if args.patch > MAX_PATCH:
        raise AppError(f"--patch {args.patch} gives D = {3 * args.patch ** 2} > {3 * MAX_PATCH ** 2}; "
                       f"use --patch <= {MAX_PATCH}")
    if not args.tol >= 0:
        raise AppError(f"--tol must be >= 0, got {args.tol}")


def _agree(ok: bool, group) -> bool:
    """True on every rank iff ``ok`` on every rank (so that one rank's bad file stops all, none hangs)."""
    import torch
    import torch.distributed as dist

    if group is None:
        return ok
    flag = torch.tensor([1 if ok else 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def _peak_memory(group) -> int | None:
    """The largest peak resident set size of the processes, in bytes (None where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:
        return None
    import torch
    import torch.distributed as dist

    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024])  # Linux reports KiB
    if group is not None:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    return int(peak)


def _fit(args: argparse.Namespace, group, device) -> int:
    import torch

    from imgmw.distributed import all_reduce_sum, rank, shard_range, world_size
    from imgmw.image import save_image
    from imgmw.prior import collect_patches, component_picture, fit_prior, held_out_log_likelihood, list_images, \
        prior_to_dict

    me, world = rank(group), world_size(group)
    say = (lambda text: print(text, file=sys.stderr)) if me == 0 and not args.quiet else (lambda text: None)
    start = time.perf_counter()
    paths = list_images(args.folder)
    if not paths:
        raise AppError(f"folder {args.folder} holds no image ({', '.join(('.png', '.jpg', '...'))})")
    if me == 0:
        check_output(args.output)
    mine = shard_range(len(paths), me, world)
    say(f"{PROG}: {len(paths)} images, {world} process(es); reading patches")
    error = None
    try:
        patches = collect_patches(paths, mine, patch=args.patch, n_scales=args.scales, n_train=args.per_image,
                                  n_held=args.held_out, seed=args.seed, max_side=args.max_side, device=device)
    except (ValueError, OSError) as err:
        error = str(err)
    if not _agree(error is None, group):
        raise AppError(error or "another process could not read its images (see its message)")
    counts = all_reduce_sum(torch.tensor([len(patches.used), len(patches.skipped)], device=device), group)
    n_images, n_skipped = int(counts[0]), int(counts[1])
    n_patches = n_images * args.per_image * args.scales
    if n_images * args.per_image < args.k:
        raise AppError(f"--k {args.k} exceeds the {n_images * args.per_image} training patches per scale "
                       f"({n_images} usable images x --per-image {args.per_image})")
    read = time.perf_counter()
    say(f"{PROG}: fitting K={args.k} to {n_patches} patches (D={3 * args.patch ** 2}, {n_skipped} images skipped)")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    fit = fit_prior(patches.train, args.k, n_iter=args.iters, tol=args.tol or None, generator=gen,
                    process_group=group)
    fitted = time.perf_counter()
    held = held_out_log_likelihood(fit.gmm, patches.held, group)
    seconds = time.perf_counter() - start
    peak = _peak_memory(group)
    if me != 0:
        return 0
    metrics = {"mean_log_likelihood": float(held.mean()), "mean_log_likelihood_per_scale": held.tolist(),
               "n_patches": n_patches, "n_held_out": n_images * args.held_out * args.scales, "n_images": n_images,
               "n_images_skipped": n_skipped, "n_processes": world, "em_steps": fit.n_iter.tolist(),
               "converged": fit.converged.tolist(), "train_mean_log_likelihood": fit.lower_bound.tolist(),
               "seconds": seconds, "peak_rss_bytes": peak, "seconds_reading": read - start,
               "seconds_fitting": fitted - read, "settings": settings(args)}
    with staged_output(args.output) as out:
        from imgmw.checkpoint import save_atomic

        save_atomic(prior_to_dict(fit.gmm, patch=args.patch, scales=args.scales, seed=args.seed), out / "prior.pt")
        save_image(component_picture(fit.gmm, args.patch), out / "components.png")
        write_json(metrics, out / "metrics.json")
    say(f"{PROG}: held-out mean log-likelihood {metrics['mean_log_likelihood']:.4f} per patch; "
        f"{seconds:.1f} s; wrote {args.output}/")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    with process_group_for(args.device) as (group, device):
        return _fit(args, group, device)


if __name__ == "__main__":
    sys.exit(run(f"python -m apps.{PROG}", main))
