"""Synthesise a texture of any size from an exemplar by multi-scale patch Mixture-Wasserstein matching.

From a Gaussian random field, the pixels are optimised so that at every pyramid scale a Gaussian mixture of their
``p×p`` patches matches the exemplar's in MW2; then a projection onto 8×8 exemplar patches (``--refine-iters 0``:
none) reconnects structures, and a short semi-dual patch optimal transport phase with a sliced colour term
(``--finish-iters``, default 60; 0: none) spreads the result over all exemplar patches and colours, and the
single off-colour pixels it leaves are replaced (``--no-despeckle``: kept) (:mod:`imgmw.texture`,
:mod:`imgmw.texture_refine`, :mod:`imgmw.texture_semidual`, :mod:`imgmw.texture_despeckle`).

Writes ``texture.png``, ``comparison.png`` (exemplar | result [| 2×2 tiling]), ``loss.png`` and ``metrics.json``
(settings, timings, losses; per exemplar: patch sliced-W2, structure distance, near-copy fraction of the noise,
the MW2-only and the final result; seam energy) under ``--output``; with ``--save-every N`` also frames.

Examples::

    python -m apps.texture_synth                                  # data/wood.png -> 256x256
    python -m apps.texture_synth data/brick.png --size 640x360 --tileable
    python -m apps.texture_synth data/stripes.png data/veins.png --mix 0.3 0.7
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from collections.abc import Sequence

from apps._cli import AppError, AppParser, DefaultsHelpFormatter, add_common_args, check_input_file, \
    check_pixel_adam_lr, non_negative_float, non_negative_int, positive_float, positive_int, resolve_device, run, \
    settings, staged_output, write_json

PROG = "texture_synth"
DEFAULT_EXEMPLAR = Path(__file__).resolve().parent.parent / "data" / "wood.png"
MAX_PATCH, MAX_SIDE = 16, 4096  # D = 3·16² = 768 (the paper's limit for full covariances ≈ 1000); 4096²: a few GB
FLAG_NAMES = {"n_components": "--k", "n_patches": "--n-patches", "patch": "--patch", "n_scales": "--scales",
              "output": "--size"}  # check_patch_counts's messages in this app's words


def build_parser() -> argparse.ArgumentParser:
    p = AppParser(prog=f"python -m apps.{PROG}", description=__doc__.split("\n\n")[0],
                  formatter_class=DefaultsHelpFormatter)
    p.add_argument("exemplar", nargs="*", type=Path, default=[DEFAULT_EXEMPLAR],
                   help="exemplar image (any format Pillow reads; default: data/wood.png); several with --mix: a "
                        "texture between them")
    p.add_argument("--mix", type=float, nargs="+", default=None, metavar="W",
                   help="one weight >= 0 per exemplar (normalised; default equal): MW2 barycentre of their mixtures")
    p.add_argument("--size", default="256", help="output size: N (N×N) or WxH, e.g. 640x360")
    p.add_argument("--patch", type=positive_int, default=4, help="patch side p of the MW2 loss (D = 3p²)")
    p.add_argument("--k", type=positive_int, default=4, help="Gaussian components per scale")
    p.add_argument("--scales", type=positive_int, default=None, help="pyramid levels (default: coarsest side >= 16)")
    p.add_argument("--n-patches", type=positive_int, default=2048, help="patches drawn per scale per step")
    p.add_argument("--optimizer", choices=("adam", "lbfgs"), default="adam", help="pixel optimiser")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="step size (default: adam 0.03, decayed linearly to 0 over --iters; lbfgs 1)")
    p.add_argument("--tileable", action="store_true", help="periodic synthesis: the output tiles seamlessly")
    p.add_argument("--stages", type=positive_int, default=1,
                   help="coarse-to-fine stages: 40%% of --iters at 1/2^(N-1) of the size, the rest at larger sizes")
    p.add_argument("--refine-iters", type=non_negative_int, default=None,
                   help="patch-projection iterations per level after the MW2 flow (default 3; 0: none)")
    p.add_argument("--finish-iters", type=non_negative_int, default=None,
                   help="semi-dual patch OT iterations after the projection (default: imgmw.texture.FINISH_ITERS; "
                        "0: none, the projection then kept only if it does not raise the patch sliced-W2)")
    p.add_argument("--finish-colour-weight", type=non_negative_float, default=None, metavar="W",
                   help="weight of the sliced colour W2² in the finish (default: imgmw.texture.FINISH_COLOUR_WEIGHT; "
                        "0: none); it keeps rare bright colours that the finish would fade")
    p.add_argument("--no-despeckle", dest="despeckle", action="store_false",
                   help="keep the single off-colour pixels the finish leaves (default: replace them)")
    p.add_argument("--prior", type=Path, default=None, metavar="PRIOR.pt",
                   help="target the per-scale patch mixtures of an apps.fit_prior prior (its patch, scales, K)")
    p.add_argument("--fixed-weights", action="store_true", help="keep uniform mixture weights (the paper's choice)")
    add_common_args(p, PROG, iters=None, iters_help="MW2 flow steps (default: imgmw.texture.MW2_ITERS)")
    return p


def _check_args(args: argparse.Namespace) -> tuple[int, int]:
    """Cheap checks before anything heavy; returns the output size ``(H, W)``."""
    from imgmw.image import parse_size

    size = parse_size(args.size)
    if max(size) > MAX_SIDE:
        raise AppError(f"--size {args.size}: sides above {MAX_SIDE} px are not supported; tile a --tileable result")
    if args.patch > MAX_PATCH:
        raise AppError(f"--patch {args.patch} is too large (vectors of {3 * args.patch ** 2} dims); use <= {MAX_PATCH}")
    for path in args.exemplar:
        check_input_file(path, "exemplar")
    if args.prior is not None:
        check_input_file(args.prior, "--prior")
        if len(args.exemplar) > 1 or args.mix is not None or args.stages > 1:
            raise AppError("--prior takes one exemplar (for the noise start) and no --mix or --stages")
    if args.mix is not None and len(args.mix) != len(args.exemplar):
        raise AppError(f"--mix needs one weight per exemplar: {len(args.exemplar)} exemplar(s), "
                       f"{len(args.mix)} weight(s)")
    if args.mix is not None and (not all(math.isfinite(w) and w >= 0 for w in args.mix) or sum(args.mix) <= 0):
        raise AppError(f"--mix weights must be finite, >= 0 and not all zero, got {args.mix}")
    if args.optimizer == "adam":
        check_pixel_adam_lr(args.lr)
    return size


def _load_prior(args: argparse.Namespace):
    """The prior's per-scale GMMs; sets ``args.patch``, ``args.scales`` and ``args.k`` from it."""
    from imgmw.checkpoint import load_file
    from imgmw.prior import prior_from_dict

    try:
        state = load_file(args.prior, "cpu")
        gmm, patch = prior_from_dict(state), int(state["patch"])
    except (ValueError, KeyError, TypeError) as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise AppError(f"--prior {args.prior}: not a prior of apps.fit_prior ({type(err).__name__}: {first})") from None
    if gmm.batch_shape == () or gmm.means.dim() != 3 or gmm.n_features != 3 * patch * patch:
        raise AppError(f"--prior {args.prior}: expected per-scale GMMs of {patch}x{patch} colour patches")
    args.patch, args.scales, args.k = patch, gmm.batch_shape[0], gmm.n_components
    return [gmm[s] for s in range(gmm.batch_shape[0])]


def _progress(args: argparse.Namespace, out_dir: Path):
    """``(callback, bar)``: a tqdm bar with the per-scale losses (read at the flow's sync points) and frames."""
    from tqdm import tqdm

    from imgmw.flow import SYNC_EVERY
    from imgmw.image import save_image

    bar = tqdm(total=args.iters + args.finish_iters, desc=PROG, disable=args.quiet, leave=False, dynamic_ncols=True)

    def callback(step: int, per_scale, image) -> None:
        if step == 0:
            bar.reset()  # restart the clock: the target fits before the first step are not steps
        bar.update(1)
        if (step + 1) % SYNC_EVERY == 0:  # per_scale lives on the device
            bar.set_postfix_str(" ".join(f"s{i}={v:.4g}" for i, v in enumerate(per_scale.tolist())), refresh=False)
        if args.save_every and (step + 1) % args.save_every == 0:
            (out_dir / "frames").mkdir(exist_ok=True)
            save_image(image[0], out_dir / "frames" / f"step_{step + 1:05d}.png")

    return callback, bar


def _write(args, stage: Path, exemplars, result, size, device, start: float) -> dict:
    """Write the images, the loss plot and ``metrics.json`` into ``stage``; returns the first exemplar's scores."""
    from apps._plots import Panel, plot_panels
    from imgmw.image import save_image, side_by_side
    from imgmw.metrics import seam_energy
    from imgmw.texture import texture_scores

    image, init, mw2_only = result.image.cpu(), result.init.cpu(), result.unrefined.cpu()
    save_image(image, stage / "texture.png")
    shown = [*exemplars, image] + ([image.repeat(1, 2, 2)] if args.tileable else [])
    save_image(side_by_side(shown, height=image.shape[-2] * (2 if args.tileable else 1)), stage / "comparison.png")
    losses = result.losses
    curves = {f"scale {s}": v.tolist() for s, v in enumerate(losses.T)} | {"total": losses.sum(1).tolist()}
    plot_panels(stage / "loss.png", [Panel(curves, "MW2² (patch GMMs)", title="texture synthesis loss", log_y=True)])
    scores = [texture_scores(image, ex, init=init, unrefined=mw2_only) for ex in exemplars]
    write_json({
        "settings": settings(args) | {"size": list(size), "scales": result.n_scales, "device": str(device),
                                      "exemplar_size": [list(e.shape[-2:]) for e in exemplars]},
        "timings": {"setup_seconds": result.setup_seconds, "optimisation_seconds": result.seconds,
                    "seconds_per_iter": result.seconds / args.iters, "refine_seconds": result.refine_seconds,
                    "finish_seconds": result.finish_seconds,
                    "total_seconds": time.perf_counter() - start},
        "loss": {"first_per_scale": losses[0].tolist(), "final_per_scale": losses[-1].tolist(),
                 "final_total": float(losses[-1].sum())}, "final_loss": float(losses[-1].sum()),
        "refit_mw2": float(result.refit_mw2.sum()), "refit_mw2_per_scale": result.refit_mw2.tolist(),
        "projection_kept": result.refined,  # without a finish: kept only if the 4×4 patch sliced-W2 does not rise
        "finished": result.finished, "speckles_replaced": result.speckles, "finish_final_per_scale": (
            None if result.finish_losses is None else result.finish_losses[-1].tolist()),
        "fit_keeping": result.fit, **{key: [sc[key] for sc in scores] for key in scores[0]},  # per exemplar, in order
        "seam_energy": {"init": seam_energy(init), "mw2_only": seam_energy(mw2_only), "result": seam_energy(image)},
    }, stage / "metrics.json")
    return scores[0]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    size = _check_args(args)
    start = time.perf_counter()

    import torch

    from imgmw.image import load_image
    from imgmw.texture import (ADAM_LR, FINISH_COLOUR_WEIGHT, FINISH_ITERS, MW2_ITERS, REFINE_ITERS, check_patch_counts,
                               synthesize_texture, texture_n_scales)

    device = resolve_device(args.device)
    targets = None if args.prior is None else _load_prior(args)
    exemplars = [load_image(path) for path in args.exemplar]
    hw = (min(e.shape[-2] for e in exemplars), min(e.shape[-1] for e in exemplars))  # too small: ValueError
    n_scales = texture_n_scales(hw, size, args.patch, args.scales)
    for exemplar in exemplars:  # before the fits, in flag words
        check_patch_counts((exemplar.shape[-2], exemplar.shape[-1]), size, args.patch, n_scales, args.k, args.n_patches,
                           args.tileable, names=FLAG_NAMES)
    args.lr = args.lr or (ADAM_LR if args.optimizer == "adam" else 1.0)
    args.refine_iters = REFINE_ITERS if args.refine_iters is None else args.refine_iters
    args.finish_iters = FINISH_ITERS if args.finish_iters is None else args.finish_iters
    args.finish_colour_weight = FINISH_COLOUR_WEIGHT if args.finish_colour_weight is None else args.finish_colour_weight
    args.iters = MW2_ITERS if args.iters is None else args.iters

    with staged_output(args.output) as stage:
        callback, bar = _progress(args, stage)
        try:
            result = synthesize_texture(
                [e.to(device) for e in exemplars], size, patch=args.patch, n_components=args.k,
                n_scales=args.scales, n_patches=args.n_patches, n_iter=args.iters, lr=args.lr,
                optimizer=args.optimizer, periodic=args.tileable, mix=args.mix, fixed_weights=args.fixed_weights,
                stages=args.stages, generator=torch.Generator().manual_seed(args.seed), callback=callback,
                targets=targets, refine_n_iter=args.refine_iters, finish_n_iter=args.finish_iters,
                finish_colour_weight=args.finish_colour_weight, despeckle=args.despeckle)
        finally:
            bar.close()
        scores = _write(args, stage, exemplars, result, size, device, start)
    if not args.quiet:
        sw, st = scores["patch_sliced_w2"], scores["structure_distance"]
        print(f"to the exemplar: patch sliced-W2 {sw['init']:.4g} (noise) -> {sw['result']:.4g}, structure distance "
              f"{st['init']:.4g} -> {st['result']:.4g} (projection {'kept' if result.refined else 'not kept'}, "
              f"semi-dual finish {'run' if result.finished else 'not run'})")
    print(f"wrote {args.output}/texture.png, comparison.png, loss.png, metrics.json")
    return 0


if __name__ == "__main__":
    sys.exit(run(PROG, main))
