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
from typing import Sequence

from apps._cli import (AppError, AppParser, add_common_args, check_input_file, positive_float, positive_int,
                       resolve_device, run, staged_output, write_json)

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
    if args.save_every < 0:
        raise AppError(f"--save-every must be >= 0, got {args.save_every}")
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


def _settings(args: argparse.Namespace) -> dict:
    """The parsed flags as JSON values (paths as strings)."""
    return {key: [str(p) for p in value] if key == "images" else str(value) if isinstance(value, Path) else value
            for key, value in vars(args).items()}


def _weights(args: argparse.Namespace, n_targets: int) -> list[float]:
    if args.weights is None:
        return [1.0 / n_targets] * n_targets
    total = sum(args.weights)
    return [w / total for w in args.weights]


# ------------------------------------------------------------------------------------------------ points
def _ellipse(ax, mean, cov, **style) -> None:
    """Draw the 2-σ ellipse of ``N(mean, cov)`` (2-D) on ``ax``."""
    import numpy as np
    from matplotlib.patches import Ellipse

    vals, vecs = np.linalg.eigh(cov)
    angle = np.degrees(np.arctan2(vecs[1, 1], vecs[0, 1]))
    ax.add_patch(Ellipse(mean, 4 * np.sqrt(vals[1]), 4 * np.sqrt(vals[0]), angle=angle, fill=False, zorder=3,
                         **style))


def _plot_points(path: Path, targets, points, fit, history: list[float] | None, generator) -> None:
    """Scatter of target samples (with 2-σ ellipses) and the barycentre points (with the fit's ellipses);
    the objective per step on a second panel when ``history`` is given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if history else 1, figsize=(11 if history else 5.5, 5), squeeze=False)
    ax = axes[0, 0]
    for i, target in enumerate(targets):
        sample = target.sample(points.shape[0], generator)[0].cpu().numpy()
        ax.scatter(sample[:, 0], sample[:, 1], s=3, alpha=0.35, color=f"C{i}", label=f"target {i + 1}")
        for m, c in zip(target.means.cpu().numpy(), target.covariances.cpu().numpy()):
            _ellipse(ax, m, c, color=f"C{i}", lw=1.2)
    xy = points.cpu().numpy()
    ax.scatter(xy[:, 0], xy[:, 1], s=3, color="black", label="barycentre points")
    for m, c in zip(fit.means.cpu().numpy(), fit.covariances.cpu().numpy()):
        _ellipse(ax, m, c, color="black", lw=1.5, ls="--")
    ax.set_aspect("equal")
    ax.legend(fontsize=8, loc="upper right", markerscale=3)
    ax.set_title("targets and their MW2 barycentre (dashed: EM fit, 2σ)")
    if history:
        curve = axes[0, 1]
        curve.plot(range(1, len(history) + 1), history, color="C0")
        curve.set_xlabel("flow step")
        curve.set_ylabel("Σ λ_i MW2²(EM(X), ν_i)")
        curve.set_title("objective")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ palettes
def _load_images(paths: Sequence[Path], max_side: int, device):
    from imgmw.image import load_image, resize_max

    return [resize_max(load_image(path), max_side).to(device) for path in paths]


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

    from imgmw.barycentre import (barycentre_flow, barycentre_objective, barycentre_weights, demo_targets,
                                  colour_targets, recolour_to_gmm, stack_targets)
    from imgmw.image import load_image, save_image, side_by_side
    from imgmw.losses import relative_reg_covar
    from imgmw.flow import SYNC_EVERY, refit_mw2
    from imgmw.ot import gmm_barycentre, mw2
    from imgmw.warm import WarmStartEM

    device = resolve_device(args.device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    t_start = time.perf_counter()
    if args.mode == "points":
        targets = demo_targets(torch.float64, device)
        images = []
    else:
        images = _load_images(args.images, args.max_side, device)
        targets = colour_targets(images, args.k, colorspace=args.colorspace, generator=gen)
    recolor_source = None if args.recolor is None else load_image(args.recolor).to(device)
    weights = _weights(args, len(targets))
    stacked = stack_targets(targets)
    t_targets = time.perf_counter()

    reg = relative_reg_covar(stacked)
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
                    _plot_points(frame, targets, x, em.state, None, gen)
                else:
                    save_image(_palette_strip(x, args.colorspace), frame)

        points, history = barycentre_flow(targets, weights, args.n_points, k=args.k, iters=args.iters, lr=args.lr,
                                          init=args.init, generator=gen, em=em, callback=progress)
        bar.close()
        t_flow = time.perf_counter()
        fit = em.state
        lam = barycentre_weights(weights, len(targets), stacked.means)
        with torch.no_grad():
            final, per_target = barycentre_objective(fit, stacked, lam)
            fixed_point = gmm_barycentre(targets, lam)
            fixed_value = barycentre_objective(fixed_point, stacked, lam)[0]
            gap = mw2(fit, fixed_point)
            refit = (lam.view(-1, *[1] * (per_target.dim() - 1)) *
                     refit_mw2(points, stacked, n_components=args.k, fixed_weights=True, reg_covar=reg,
                               generator=gen)).sum(0)
        written = []
        if args.mode == "points":
            _plot_points(out / "barycenter.png", targets, points, fit, history, gen)
            written.append("barycenter.png")
        else:
            save_image(_palette_strip(points, args.colorspace), out / "palette.png")
            samples = [target.sample(args.n_points, gen)[0] for target in targets]
            strips = [_palette_strip(s, args.colorspace) for s in samples] + [_palette_strip(points, args.colorspace)]
            thumbs = [side_by_side(images, height=THUMB), side_by_side(strips, height=THUMB)]
            save_image(_stack_rows(thumbs), out / "comparison.png")
            written += ["palette.png", "comparison.png"]
            if recolor_source is not None:
                recoloured, _ = recolour_to_gmm(recolor_source, fit, colorspace=args.colorspace,
                                                iters=args.recolor_iters, generator=gen)
                save_image(recoloured, out / "recolored.png")
                written.append("recolored.png")
        metrics = {
            "settings": _settings(args),
            "device": str(device),
            "weights": weights,
            "seconds_targets": t_targets - t_start,
            "seconds_flow": t_flow - t_targets,
            "seconds_total": time.perf_counter() - t_start,
            "first_objective": history[0],
            "final_objective": float(final),
            "final_loss": history[-1],
            "refit_mw2": float(refit.sum()),
            "fit_keeping": em.diagnostics.as_dict(),
            "per_target_mw2": per_target.tolist(),
            "fixed_point_objective": float(fixed_value),
            "mw2_flow_fit_to_fixed_point": float(gap),
        }
        write_json(metrics, out / "metrics.json")
    print(f"wrote {', '.join(written)} and metrics.json in {args.output}/ (objective "
          f"{metrics['first_objective']:.4g} -> {metrics['final_objective']:.4g}; fixed-point barycentre "
          f"{metrics['fixed_point_objective']:.4g})")
    return 0


def _stack_rows(rows):
    """Stack ``[3, h, w_i]`` images vertically on a white canvas of the widest width."""
    import torch

    width = max(r.shape[-1] for r in rows)
    padded = [torch.nn.functional.pad(r, (0, width - r.shape[-1]), value=1.0) for r in rows]
    return torch.cat(padded, -2)


if __name__ == "__main__":
    sys.exit(run(f"python -m apps.{NAME}", main))
