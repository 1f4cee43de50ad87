"""Mixture-Wasserstein barycentres by a flow of points: a 2-D point cloud, or the colour palette of several images.

    python -m apps.barycenter                                   # --mode points: the paper's 2-D experiment
    python -m apps.barycenter --mode palette IMG1 IMG2 [IMG3 ...] [--weights W1 W2 ...] [--recolor IMG]

The flow minimises  Σ_i λ_i MW2²(EM_K(X), ν_i)  over points X started as standard normal noise, with one
warm-started, fixed-weight EM step per iteration (imgmw.barycentre.barycentre_flow).

--mode points: three 2-component 2-D target mixtures, 500 points, K=2. Writes barycenter.png (targets,
barycentre points and fitted ellipses, objective curve) and metrics.json.
--mode palette: the targets are the K=10 colour mixtures of the images; the barycentre's points are
colours. Writes palette.png (the barycentric palette), comparison.png (inputs, each image's palette and
the barycentric one), with --recolor IMG also recolored.png (IMG recoloured to the barycentric palette),
and metrics.json. Outputs go to --output (default outputs/barycenter/).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from collections.abc import Sequence

from apps._cli import (AppError, AppParser, add_common_args, check_input_file, positive_float, positive_int,
                       resolve_device, run, settings, staged_output, write_json)

NAME = "barycenter"
THUMB = 160  # height of the image thumbnails in comparison.png


def build_parser() -> argparse.ArgumentParser:
    p = AppParser(prog=f"python -m apps.{NAME}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="*", type=Path, help="--mode palette: two or more images whose palettes to average")
    p.add_argument("--mode", default="points", choices=("points", "palette"),
                   help="points: the 2-D experiment (default); palette: colour-palette barycentre of IMAGES")
    p.add_argument("--weights", type=float, nargs="+", metavar="W",
                   help="barycentric weights, one per target, >= 0 (normalised to sum 1; default uniform)")
    p.add_argument("--k", type=positive_int, help="components of every mixture (default: 2 points, 10 palette)")
    p.add_argument("--n-points", type=positive_int, help="points of the barycentre (default: 500 points, 1000 palette)")
    p.add_argument("--lr", type=positive_float,
                   help="Euler step of the flow x <- x - lr·N·grad (default: 0.1 points, 0.05 palette)")
    p.add_argument("--init", choices=("normal", "moments"),
                   help="starting noise: normal = standard normal (the paper; default for points), moments = normal "
                        "with the targets' mean and covariance (default for palette)")
    p.add_argument("--colorspace", default="lab", choices=("rgb", "lab"), help="--mode palette: space of the mixtures")
    p.add_argument("--max-side", type=positive_int, default=256,
                   help="--mode palette: images are downscaled to this longest side before fitting (default 256)")
    p.add_argument("--recolor", type=Path, metavar="IMG",
                   help="--mode palette: also recolour IMG to the barycentric palette (colour-transfer flow)")
    p.add_argument("--recolor-iters", type=positive_int, default=100, help="steps of the --recolor flow (default 100)")
    add_common_args(p, NAME, iters=150)
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.mode == "points":
        if args.images or args.recolor is not None:
            raise AppError("--mode points takes no images and no --recolor; use --mode palette IMG1 IMG2 ...")
        n_targets = 3
    else:
        if len(args.images) < 2:
            raise AppError(f"--mode palette needs two or more images, got {len(args.images)}")
        for path in args.images:
            check_input_file(path, "image")
        if args.recolor is not None:
            check_input_file(args.recolor, "--recolor image")
        n_targets = len(args.images)
    if args.weights is not None:
        if len(args.weights) != n_targets:
            raise AppError(f"--weights needs {n_targets} values (one per target), got {len(args.weights)}")
        if not all(0 <= w < float("inf") for w in args.weights) or sum(args.weights) <= 0:
            raise AppError(f"--weights must be finite, >= 0 and not all 0, got {args.weights}")
    defaults = {"points": (2, 500, 0.1, "normal"), "palette": (10, 1000, 0.05, "moments")}[args.mode]
    args.k = defaults[0] if args.k is None else args.k
    args.n_points = defaults[1] if args.n_points is None else args.n_points
    args.lr = defaults[2] if args.lr is None else args.lr
    args.init = defaults[3] if args.init is None else args.init
    if args.n_points < args.k:
        raise AppError(f"--n-points ({args.n_points}) must be at least --k ({args.k})")


def _palette_strip(points, space: str):
    """Swatch of colour points given in scaled ``space``."""
    from imgmw.barycentre import palette_image
    from imgmw.colour import from_scaled_space

    return palette_image(from_scaled_space(points, space))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)

    import torch
    from tqdm import tqdm

    from apps._mixture_plots import plot_barycentre
    from imgmw.barycentre import (barycentre_flow, barycentre_report, colour_targets, demo_targets, recolour_to_gmm,
                                  stack_targets)
    from imgmw.flow import SYNC_EVERY
    from imgmw.image import load_image, resize_max, save_image, side_by_side, stack_rows
    from imgmw.losses import relative_reg_covar
    from imgmw.warm import WarmStartEM

    device = resolve_device(args.device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    t_start = time.perf_counter()
    images = [resize_max(load_image(path), args.max_side).to(device) for path in args.images]
    targets = (demo_targets(torch.float64, device) if args.mode == "points" else
               colour_targets(images, args.k, colorspace=args.colorspace, generator=gen))
    recolor_source = None if args.recolor is None else load_image(args.recolor).to(device)
    weights = [1.0 / len(targets)] * len(targets) if args.weights is None else \
        [w / sum(args.weights) for w in args.weights]
    t_targets = time.perf_counter()
    reg = relative_reg_covar(stack_targets(targets))
    em = WarmStartEM(args.k, fixed_weights=True, reg_covar=reg, n_init_iter=30, generator=gen)
    with staged_output(args.output) as out:
        bar = tqdm(total=args.iters, desc="barycentre flow", disable=args.quiet, file=sys.stderr)

        def progress(i: int, energy, x) -> None:
            bar.update(1)
            if (i + 1) % SYNC_EVERY == 0:  # the energy is a device tensor: read it where the flow reads its own
                bar.set_postfix(objective=f"{float(energy):.4g}")
            if args.save_every and (i + 1) % args.save_every == 0:
                frame = out / f"frame_{i + 1:05d}.png"
                if args.mode == "points":
                    plot_barycentre(frame, targets, x, em.state, None, gen)
                else:
                    save_image(_palette_strip(x, args.colorspace), frame)

        points, history = barycentre_flow(targets, weights, args.n_points, n_components=args.k, n_iter=args.iters,
                                          lr=args.lr, init=args.init, generator=gen, em=em, callback=progress)
        bar.close()
        t_flow = time.perf_counter()
        fit = em.state
        if fit is None:
            raise RuntimeError("the barycentre flow ended without an EM fit")
        report = barycentre_report(points, fit, targets, weights, n_components=args.k, reg_covar=reg,
                                   generator=gen)
        written = []
        if args.mode == "points":
            plot_barycentre(out / "barycenter.png", targets, points, fit, history, gen)
            written.append("barycenter.png")
        else:
            save_image(_palette_strip(points, args.colorspace), out / "palette.png")
            strips = [_palette_strip(t.sample(args.n_points, gen)[0], args.colorspace) for t in targets]
            strips.append(_palette_strip(points, args.colorspace))
            save_image(stack_rows([side_by_side(images, height=THUMB), side_by_side(strips, height=THUMB)]),
                       out / "comparison.png")
            written += ["palette.png", "comparison.png"]
            if recolor_source is not None:
                recoloured, _ = recolour_to_gmm(recolor_source, fit, colorspace=args.colorspace,
                                                n_iter=args.recolor_iters, generator=gen)
                save_image(recoloured, out / "recolored.png")
                written.append("recolored.png")
        metrics = {"settings": settings(args), "device": str(device), "weights": weights,
                   "seconds_targets": t_targets - t_start, "seconds_flow": t_flow - t_targets,
                   "seconds_total": time.perf_counter() - t_start, "first_objective": history[0],
                   "final_loss": history[-1], "fit_keeping": em.diagnostics.as_dict(), **report}
        write_json(metrics, out / "metrics.json")
    print(f"wrote {', '.join(written)} and metrics.json in {args.output}/ (objective "
          f"{metrics['first_objective']:.4g} -> {metrics['final_objective']:.4g}; fixed-point barycentre "
          f"{metrics['fixed_point_objective']:.4g})")
    return 0


if __name__ == "__main__":
    sys.exit(run(f"python -m apps.{NAME}", main))
