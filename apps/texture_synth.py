"""Synthesise a texture of any size from an exemplar by multi-scale patch Mixture-Wasserstein matching.

The output starts as a Gaussian random field with the exemplar's colour mean and covariance and its
pixels are optimised (Adam with a linearly decaying step, or L-BFGS) so that, at every scale of a
Gaussian pyramid, a small Gaussian mixture fitted to the output's ``p×p`` patches matches the one
fitted to the exemplar's patches in MW2 (:mod:`imgmw.texture`). Pixels are clamped to [0, 1] after every step.

Outputs (under ``--output``, default ``outputs/texture_synth/``): ``texture.png`` (the result),
``comparison.png`` (exemplar | result, plus a 2×2 tiling of the result with ``--tileable``),
``loss.png`` (loss per scale against the step), ``metrics.json`` (settings, timings, final loss per
scale, the scores below and seam energy of the initial noise and of the result) and, with
``--save-every N``, ``frames/step_NNNNN.png``. Nothing is written when the run fails.

With several exemplars the targets are, at every scale, the MW2 barycentre of their patch mixtures with the
``--mix`` weights (texture mixing). ``metrics.json`` scores the result against every exemplar: 4×4 patch
sliced-W2, the structure distance (RMS distance of 15×15 patches to their nearest exemplar patch) and the
near-copy fraction (:mod:`imgmw.metrics`).

Examples::

    python -m apps.texture_synth                                  # data/wood.png -> 256x256
    python -m apps.texture_synth data/brick.png --size 640x360 --tileable
    python -m apps.texture_synth data/stripes.png data/veins.png --mix 0.3 0.7
    python -m apps.texture_synth data/wood.png --prior outputs/fit_prior/prior.pt   # a folder's patch prior
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from apps._cli import AppError, AppParser, add_common_args, check_input_file, check_pixel_adam_lr, positive_float, \
    positive_int, resolve_device, run, staged_output, write_json

PROG = "texture_synth"
DEFAULT_EXEMPLAR = Path(__file__).resolve().parent.parent / "data" / "wood.png"
DEFAULT_SIZE = "256"
DEFAULT_ITERS = 300
# Default patch 4, measured on data/wood.png (128×128, 150 steps, 2 threads): p=4 took 12.6 s and cut
# the 4×4 / 8×8 patch sliced-W2 of the noise start by 2.4× / 2.3×; p=8 took 65 s (5.2× longer) for
# 2.9× / 3.5×. Only p=4 fits the 60 s budget of a default 256×256 run.
MAX_PATCH = 16      # D = 3·p² = 768: the paper's practical limit for full covariances is D ≈ 1000
MAX_SIDE = 4096     # output side cap: a 4096² synthesis already needs a few GB with the optimiser's state
FLAG_NAMES = {"n_components": "--k", "n_patches": "--n-patches", "patch": "--patch", "n_scales": "--scales",
              "output": "--size"}  # check_patch_counts's messages in this app's words
METRIC_PATCH = 4    # patch sliced-W2 in metrics.json always uses 4×4 patches, so runs compare


def build_parser() -> argparse.ArgumentParser:
    p = AppParser(prog=f"python -m apps.{PROG}", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("exemplar", nargs="*", type=Path, default=[DEFAULT_EXEMPLAR],
                   help="exemplar image (any format Pillow reads); several with --mix: a texture between them")
    p.add_argument("--mix", type=float, nargs="+", default=None, metavar="W",
                   help="one weight >= 0 per exemplar (normalised): synthesise from the MW2 barycentre of their "
                        "patch mixtures (default: equal weights)")
    p.add_argument("--size", default=DEFAULT_SIZE, help="output size: N (N×N) or WxH, e.g. 640x360")
    p.add_argument("--patch", type=positive_int, default=4,
                   help="patch side p (4 or 8; D = 3p²). 8 follows larger structures but costs ~5x per step")
    p.add_argument("--k", type=positive_int, default=4, help="Gaussian components per scale")
    p.add_argument("--scales", type=positive_int, default=None,
                   help="pyramid levels (default: as many as keep the coarsest side >= 16 px)")
    p.add_argument("--n-patches", type=positive_int, default=None,
                   help="patches drawn per scale per step (default 2048)")
    p.add_argument("--optimizer", choices=("adam", "lbfgs"), default="adam", help="pixel optimiser")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="step size (default: adam 0.03, decayed linearly to 0 over --iters; lbfgs 1)")
    p.add_argument("--tileable", action="store_true", help="periodic synthesis: the output tiles seamlessly")
    p.add_argument("--stages", type=positive_int, default=1,
                   help="coarse-to-fine stages: 40%% of --iters at 1/2^(N-1) of the size, the rest shared by the "
                        "larger sizes (see imgmw.texture and the README's structure table)")
    p.add_argument("--prior", type=Path, default=None, metavar="PRIOR.pt",
                   help="target the per-scale patch mixtures of a prior from apps.fit_prior instead of the exemplar's "
                        "(its patch size, scales and K are used; the exemplar gives the noise start)")
    p.add_argument("--fixed-weights", action="store_true",
                   help="keep uniform mixture weights (the paper's choice; collapses more often, see imgmw.texture)")
    add_common_args(p, PROG, iters=DEFAULT_ITERS)
    return p


def _check_args(args: argparse.Namespace) -> tuple[int, int]:
    """Cheap checks before anything heavy; returns the output size ``(H, W)``."""
    from imgmw.image import parse_size

    size = parse_size(args.size)
    if max(size) > MAX_SIDE:
        raise AppError(f"--size {args.size}: sides above {MAX_SIDE} px are not supported; tile a smaller "
                       "--tileable result instead")
    if args.patch > MAX_PATCH:
        raise AppError(f"--patch {args.patch} is too large (patch vectors of {3 * args.patch ** 2} dims); "
                       f"use at most {MAX_PATCH}, typically 4 or 8")
    if args.save_every < 0:
        raise AppError(f"--save-every must be >= 0, got {args.save_every}")
    for path in args.exemplar:
        check_input_file(path, "exemplar")
    if args.prior is not None:
        check_input_file(args.prior, "--prior")
        if len(args.exemplar) > 1 or args.mix is not None or args.stages > 1:
            raise AppError("--prior takes one exemplar (for the noise start) and no --mix or --stages")
    if args.mix is not None:
        if len(args.mix) != len(args.exemplar):
            raise AppError(f"--mix needs one weight per exemplar: {len(args.exemplar)} exemplar(s), "
                           f"{len(args.mix)} weight(s)")
        if not all(math.isfinite(w) and w >= 0 for w in args.mix) or sum(args.mix) <= 0:
            raise AppError(f"--mix weights must be finite, >= 0 and not all zero, got {args.mix}")
    return size


def _load_prior(args: argparse.Namespace):
    """The prior's per-scale GMMs; sets ``args.patch``, ``args.scales`` and ``args.k`` from it."""
    from imgmw.checkpoint import load_file
    from imgmw.prior import prior_from_dict

    try:
        state = load_file(args.prior, "cpu")
        gmm = prior_from_dict(state)
        patch = int(state["patch"])
    except (ValueError, KeyError, TypeError) as err:
        raise AppError(f"--prior {args.prior}: not a prior written by apps.fit_prior "
                       f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''})") from None
    if gmm.batch_shape == () or gmm.means.dim() != 3 or gmm.n_features != 3 * patch * patch:
        raise AppError(f"--prior {args.prior}: expected per-scale GMMs of {patch}x{patch} colour patches")
    args.patch, args.scales, args.k = patch, gmm.batch_shape[0], gmm.n_components
    return [gmm[s] for s in range(gmm.batch_shape[0])]


def _progress(args: argparse.Namespace, out_dir: Path):
    """``(callback, bar)``: updates a tqdm bar with the per-scale losses (read from the device at the flow's sync
    points only) and saves frames if asked."""
    from tqdm import tqdm

    from imgmw.flow import SYNC_EVERY
    from imgmw.image import save_image

    bar = tqdm(total=args.iters, desc=PROG, disable=args.quiet, leave=False, dynamic_ncols=True)

    def callback(step: int, image, per_scale) -> None:
        if step == 0:
            bar.reset()  # restart the clock: the target fits before the first step are not steps
        bar.update(1)
        if (step + 1) % SYNC_EVERY == 0:
            bar.set_postfix_str(" ".join(f"s{i}={v:.4g}" for i, v in enumerate(per_scale.tolist())), refresh=False)
        if args.save_every and (step + 1) % args.save_every == 0:
            frames = out_dir / "frames"
            frames.mkdir(exist_ok=True)
            save_image(image[0], frames / f"step_{step + 1:05d}.png")

    return callback, bar


def _comparison(exemplars, result, tileable: bool):
    """``exemplar(s) | result`` at the result's height, or ``exemplar(s) | result | 2×2 tiling of result`` at
    twice its height when tileable (the tiling at full resolution, so a seam would show)."""
    from imgmw.image import side_by_side

    images = [*exemplars, result]
    if tileable:
        images.append(result.repeat(1, 2, 2))
    height = result.shape[-2] * (2 if tileable else 1)
    return side_by_side([img.cpu() for img in images], height=height)


def _plot_loss(losses, path: Path) -> None:
    """Loss per scale and in total against the step (log scale)."""
    from apps._plots import Panel, plot_panels

    curves = {f"scale {s}": losses[:, s].tolist() for s in range(losses.shape[1])}
    curves["total"] = losses.sum(1).tolist()
    plot_panels(path, [Panel(curves, "MW2² (patch GMMs)", title="texture synthesis loss", log_y=True)])


def _scores(init, image, exemplar) -> dict[str, Any]:
    """Patch sliced-W2 (4×4), structure distance and near-copy fraction (15×15) of the noise start and of the
    result against one exemplar (:mod:`imgmw.metrics`)."""
    from imgmw.metrics import (COPY_RATIO, STRUCTURE_PATCH, near_copy_fraction, patch_sliced_w2,
                               structure_distance)

    return {"patch_sliced_w2": {"patch": METRIC_PATCH, "init": patch_sliced_w2(init, exemplar, patch=METRIC_PATCH),
                                "result": patch_sliced_w2(image, exemplar, patch=METRIC_PATCH)},
            "structure_distance": {"patch": STRUCTURE_PATCH, "init": structure_distance(init, exemplar),
                                   "result": structure_distance(image, exemplar)},
            "near_copy_fraction": {"patch": STRUCTURE_PATCH, "distance_over_contrast_below": COPY_RATIO,
                                   "result": near_copy_fraction(image, exemplar)}}


def _metrics(args: argparse.Namespace, size: tuple[int, int], exemplars, result, device, total: float,
             scores: list[dict], seams: dict) -> dict[str, Any]:
    losses = result.losses
    return {
        "settings": {
            "exemplar": [str(p) for p in args.exemplar], "mix": args.mix,
            "exemplar_size": [list(e.shape[-2:]) for e in exemplars], "size": list(size),
            "patch": args.patch, "k": args.k, "scales": result.n_scales, "n_patches": args.n_patches,
            "iters": args.iters, "stages": args.stages, "prior": None if args.prior is None else str(args.prior), "optimizer": args.optimizer, "lr": args.lr,
            "tileable": args.tileable,
            "fixed_weights": args.fixed_weights, "seed": args.seed, "device": str(device),
        },
        "timings": {
            "setup_seconds": result.setup_seconds, "optimisation_seconds": result.seconds,
            "seconds_per_iter": result.seconds / args.iters, "total_seconds": total,
        },
        "loss": {
            "first_per_scale": losses[0].tolist(), "final_per_scale": losses[-1].tolist(),
            "final_total": float(losses[-1].sum()),
        },
        "final_loss": float(losses[-1].sum()),
        "refit_mw2": float(result.refit_mw2.sum()),
        "refit_mw2_per_scale": result.refit_mw2.tolist(),
        "fit_keeping": result.fit,
        # against each exemplar, in the order given
        "patch_sliced_w2": [sc["patch_sliced_w2"] for sc in scores],
        "structure_distance": [sc["structure_distance"] for sc in scores],
        "near_copy_fraction": [sc["near_copy_fraction"] for sc in scores],
        "seam_energy": seams,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    size = _check_args(args)
    if args.optimizer == "adam":
        check_pixel_adam_lr(args.lr)
    start = time.perf_counter()

    import torch

    from imgmw.image import load_image, save_image
    from imgmw.metrics import seam_energy
    from imgmw.texture import ADAM_LR, DEFAULT_PATCHES, check_patch_counts, synthesize_texture, texture_n_scales

    device = resolve_device(args.device)
    targets = None if args.prior is None else _load_prior(args)
    exemplars = [load_image(path) for path in args.exemplar]
    hw = (min(e.shape[-2] for e in exemplars), min(e.shape[-1] for e in exemplars))
    n_scales = texture_n_scales(hw, size, args.patch, args.scales)  # too small: ValueError
    args.n_patches = args.n_patches or DEFAULT_PATCHES
    for exemplar in exemplars:  # before the fits, in flag words
        check_patch_counts(tuple(exemplar.shape[-2:]), size, args.patch, n_scales, args.k, args.n_patches,
                           args.tileable, names=FLAG_NAMES)
    args.lr = args.lr or (ADAM_LR if args.optimizer == "adam" else 1.0)
    generator = torch.Generator().manual_seed(args.seed)

    with staged_output(args.output) as stage:
        callback, bar = _progress(args, stage)
        try:
            result = synthesize_texture(
                [e.to(device) for e in exemplars], size, patch=args.patch, n_components=args.k,
                n_scales=args.scales, n_patches=args.n_patches, iters=args.iters, lr=args.lr,
                optimizer=args.optimizer, periodic=args.tileable, mix=args.mix, fixed_weights=args.fixed_weights,
                stages=args.stages, generator=generator, callback=callback, targets=targets)
        finally:
            bar.close()
        image, init = result.image.cpu(), result.init.cpu()
        save_image(image, stage / "texture.png")
        save_image(_comparison(exemplars, image, args.tileable), stage / "comparison.png")
        _plot_loss(result.losses, stage / "loss.png")
        scores = [_scores(init, image, exemplar) for exemplar in exemplars]
        seams = {"init": seam_energy(init), "result": seam_energy(image)}
        metrics = _metrics(args, size, exemplars, result, device, time.perf_counter() - start, scores, seams)
        write_json(metrics, stage / "metrics.json")
    patch_sw = scores[0]["patch_sliced_w2"]

    if not args.quiet:
        print(f"patch sliced-W2 to the exemplar: {patch_sw['init']:.4g} (noise) -> {patch_sw['result']:.4g} "
              f"(result); {result.seconds:.1f} s for {args.iters} steps")
    print(f"wrote {args.output}/texture.png, comparison.png, loss.png, metrics.json")
    return 0


if __name__ == "__main__":
    sys.exit(run(PROG, main))
