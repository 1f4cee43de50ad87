"""Recolour a photo with the colours of another, by Gaussian-mixture optimal transport.

    python -m apps.color_transfer [SOURCE TARGET] [--method flow|map|unbalanced] [--colorspace rgb|lab]

With no images it recolours data/coffee.jpg with the palette of data/rocket.jpg. Writes the result,
comparison.png (source | target | result) and metrics.json under --output (default
outputs/color_transfer/).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from collections.abc import Sequence

from apps._cli import (AppError, AppParser, add_common_args, check_input_file, non_negative_int, positive_float,
                       positive_int, resolve_device, run, staged_output, write_json)

NAME = "color_transfer"
DATA = Path(__file__).resolve().parent.parent / "data"
DEFAULT_SOURCE, DEFAULT_TARGET = DATA / "coffee.jpg", DATA / "rocket.jpg"


def build_parser() -> argparse.ArgumentParser:
    p = AppParser(prog=f"python -m apps.{NAME}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE, help="image to recolour")
    p.add_argument("target", nargs="?", type=Path, default=DEFAULT_TARGET, help="image whose colours to take")
    p.add_argument("--method", default="flow", choices=("flow", "map", "unbalanced"),
                   help="flow: MW2 flow with warm-started EM (the paper's method); map: GMM-OT map; "
                        "unbalanced: the flow on unbalanced MW2 (robust to target colours absent from the source)")
    p.add_argument("--map-method", default="bary", choices=("bary", "rand"), help="map used by --method map")
    p.add_argument("--colorspace", default="lab", choices=("rgb", "lab"), help="space of the mixtures")
    p.add_argument("--k", type=positive_int, default=20, help="mixture components on both sides (default 20)")
    p.add_argument("--lr", type=positive_float, default=0.2, help="step size of the flow (default 0.2)")
    p.add_argument("--optimizer", default="gd", choices=("gd", "adam"),
                   help="gd: Wasserstein gradient descent, every pixel moves at the gradient's speed (default); "
                        "adam: Adam on the palette colours")
    p.add_argument("--regrain", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the source's grain and edges (Pitié's regrain post-process; default on)")
    p.add_argument("--luminance", default="match", choices=("match", "free"),
                   help="match: L* follows its monotone match to the target's and the flow moves a*, b* (needs "
                        "--colorspace lab; default); free: the flow moves all three coordinates")
    p.add_argument("--polish-iters", type=non_negative_int, default=30, metavar="N",
                   help="flow steps after regrain that bring the colours back to the target (default 30; 0: none)")
    p.add_argument("--fixed-weights", action="store_true",
                   help="keep uniform mixture weights 1/K (the paper's choice; learned weights measure better)")
    p.add_argument("--max-colors", type=positive_int, default=2048,
                   help="at most this many distinct (quantised) colours are optimised; the result is spread "
                        "to all pixels by a 3-D lookup table (default 2048)")
    p.add_argument("--lambdas", type=positive_float, nargs=2, default=(10.0, 0.1), metavar=("SOURCE", "TARGET"),
                   help="KL penalties of --method unbalanced (default 10 0.1)")
    p.add_argument("--format", default="png", choices=("png", "jpg"), help="format of the result image")
    add_common_args(p, NAME, iters=100)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_input_file(args.source, "source image")
    check_input_file(args.target, "target image")
    if args.luminance == "match" and args.colorspace != "lab":
        raise AppError(f"--luminance match needs --colorspace lab (got {args.colorspace}); use --luminance free")

    import torch
    from tqdm import tqdm

    from imgmw.colour import transfer_colours
    from imgmw.flow import SYNC_EVERY
    from imgmw.image import load_image, save_image, side_by_side
    from imgmw.metrics import color_sliced_w2, false_edges, luminance_ssim

    device = resolve_device(args.device)
    source = load_image(args.source).to(device)
    target = load_image(args.target).to(device)
    t_start = time.perf_counter()
    with staged_output(args.output) as out:
        steps = (0 if args.method == "map" else args.iters) + (args.polish_iters if args.regrain else 0)
        bar = tqdm(total=steps, desc="colour flow", disable=args.quiet or steps == 0,
                   file=sys.stderr)

        def progress(i: int, loss, render) -> None:
            bar.update(1)
            if (i + 1) % SYNC_EVERY == 0:  # the loss is a device tensor: read it where the flow reads its own
                bar.set_postfix(mw2=f"{float(loss):.3g}")
            if args.save_every and (i + 1) % args.save_every == 0:
                save_image(render(), out / f"frame_{i + 1:05d}.png")

        try:
            result = transfer_colours(source, target, method=args.method, colorspace=args.colorspace,
                                      n_components=args.k, n_iter=args.iters, lr=args.lr, optimizer=args.optimizer,
                                      max_colors=args.max_colors, unbalanced=tuple(args.lambdas),
                                      map_method=args.map_method, fixed_weights=args.fixed_weights,
                                      luminance=args.luminance, regrain=args.regrain, polish_n_iter=args.polish_iters,
                                      generator=torch.Generator(device=device).manual_seed(args.seed),
                                      callback=progress)
        except ValueError as err:  # the library's argument name in this app's words
            raise AppError(str(err).replace("n_components=", "--k ")) from None
        bar.close()
        image_name = f"result.{args.format}"
        save_image(result.image, out / image_name)
        save_image(side_by_side([source, target, result.image], height=min(512, source.shape[-2])),
                   out / "comparison.png")
        metrics = {
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "device": str(device),
            "seconds_algorithm": result.seconds,
            "seconds_total": time.perf_counter() - t_start,
            "palette_colours": result.n_colours,
            "palette_levels": result.levels,
            "polish_kept": result.polish_kept,
            "final_loss": result.losses[-1] if result.losses else None,
            "first_loss": result.losses[0] if result.losses else None,
            "refit_mw2": result.refit_mw2,
            "fit_keeping": result.fit,
            "colour_sw2_source_to_target": color_sliced_w2(source, target, seed=args.seed),
            "colour_sw2_result_to_target": color_sliced_w2(result.image, target, seed=args.seed),
            "luminance_ssim_result_vs_source": luminance_ssim(result.image, source),
            "false_edges": false_edges(result.image, source),
        }
        write_json(metrics, out / "metrics.json")
    print(f"wrote {args.output / image_name}, comparison.png and metrics.json in {args.output}/ "
          f"(colour SW2 to target {metrics['colour_sw2_source_to_target']:.4f} -> "
          f"{metrics['colour_sw2_result_to_target']:.4f}, luminance SSIM "
          f"{metrics['luminance_ssim_result_vs_source']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(run(f"python -m apps.{NAME}", main))
