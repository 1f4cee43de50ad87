"""Paint a photo in the style of another image with Mixture-Wasserstein losses on feature mixtures.

    python -m apps.style_transfer [CONTENT STYLE] [--features auto|vgg19|patches] [--weights PATH] [--download]

With no images it paints data/chelsea.jpg in the style of data/wood.png. The pixels start at the content
image and take --iters Adam steps on  sum_l MW2^2(EM_K(features_l(x)), style GMM_l) / d_l^2  with one
warm-started EM step per layer per iteration (the paper's style-transfer experiment).

Features: vgg19 (the paper's; layers relu1_1, relu2_1, relu3_1) needs torchvision's VGG-19 ImageNet
weights, read from the torch hub cache or --weights and downloaded only with --download; patches
(3x3 pixel patches at 3 pyramid levels) needs nothing; auto picks vgg19 when its weights are on this
machine, else patches.

--prior PRIOR.pt takes the style from a patch prior of a whole image folder (python -m apps.fit_prior): its
per-scale patch mixtures are the style targets, with patch features of its patch size and scales.

Writes stylised.png, comparison.png (content | style | result), style_gmm.pt (the style as its small
mixtures, imgmw.style.StyleModel.load reads it) and metrics.json under --output
(default outputs/style_transfer/).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from collections.abc import Sequence

from apps._cli import (AppError, AppParser, add_common_args, check_input_file, check_pixel_adam_lr,
                       non_negative_float, non_negative_int, positive_float, positive_int, resolve_device, run,
                       settings, staged_output, write_json)

NAME = "style_transfer"
DATA = Path(__file__).resolve().parent.parent / "data"
DEFAULT_CONTENT, DEFAULT_STYLE = DATA / "chelsea.jpg", DATA / "wood.png"


def build_parser() -> argparse.ArgumentParser:
    p = AppParser(prog=f"python -m apps.{NAME}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("content", nargs="?", type=Path, default=DEFAULT_CONTENT, help="image whose content to keep")
    p.add_argument("style", nargs="?", type=Path, default=DEFAULT_STYLE, help="image whose style to take")
    p.add_argument("--features", default="auto", choices=("auto", "vgg19", "patches"),
                   help="feature extractor (default auto: vgg19 if its weights are available offline, else patches)")
    p.add_argument("--weights", type=Path, default=None, metavar="PATH",
                   help="VGG-19 weights file (torchvision's vgg19-dcbb9e9d.pth); default: the torch hub cache")
    p.add_argument("--download", action="store_true",
                   help="allow downloading the VGG-19 weights (548 MB) into the torch hub cache if missing")
    p.add_argument("--k", type=positive_int, default=3, help="mixture components per layer (default 3)")
    p.add_argument("--lr", type=positive_float, default=None, help="Adam step on the pixels (default 0.01)")
    p.add_argument("--size", type=positive_int, default=256,
                   help="largest side of the content and style images, which are downscaled to it (default 256)")
    p.add_argument("--content-weight", type=non_negative_float, default=0.0,
                   help="weight of the relative content error on the deepest features (default 0: the "
                        "initialisation at the content keeps it)")
    p.add_argument("--n-samples", type=positive_int, default=2048,
                   help="feature positions per layer per step for the EM fits (default 2048)")
    p.add_argument("--restart-every", type=non_negative_int, default=0, metavar="R",
                   help="restart the warm-started EM fits from the style mixtures every R steps (default 0: "
                        "never, the paper's warm start)")
    p.add_argument("--patch", type=positive_int, default=3, help="patch side of --features patches (default 3)")
    p.add_argument("--prior", type=Path, default=None, metavar="PRIOR.pt",
                   help="take the style from a patch prior of apps.fit_prior instead of STYLE (patch features with "
                        "the prior's patch size, scales and K; STYLE is then only shown and scored against)")
    add_common_args(p, NAME, iters=100)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_input_file(args.content, "content image")
    check_input_file(args.style, "style image")
    if args.prior is not None:
        check_input_file(args.prior, "--prior")
        if args.features == "vgg19" or args.weights is not None:
            raise AppError("--prior is a patch prior: it takes neither --features vgg19 nor --weights")
    if args.weights is not None and args.features == "patches":
        raise AppError("--weights is for --features vgg19 (or auto); drop it or change --features")
    check_pixel_adam_lr(args.lr)

    import torch
    from tqdm import tqdm

    from imgmw.flow import SYNC_EVERY
    from imgmw.image import load_image, resize_max, save_image, side_by_side
    from imgmw.style import make_extractor, style_transfer

    device = resolve_device(args.device)
    content = resize_max(load_image(args.content), args.size).to(device)
    style = resize_max(load_image(args.style), args.size).to(device)
    target = style
    if args.prior is not None:
        target = _prior_model(args.prior)
        args.features, args.k = "patches", target.gmms[0].n_components
        extractor = make_extractor(**target.extractor)
    else:
        extractor = make_extractor(args.features, weights=args.weights, download=args.download, patch=args.patch)
    extractor.check_size(content.shape[-2], content.shape[-1],
                         what=f"content ({args.content}, after --size {args.size})")
    extractor.check_size(style.shape[-2], style.shape[-1], what=f"style ({args.style}, after --size {args.size})")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    t_start = time.perf_counter()
    with staged_output(args.output) as out:
        bar = tqdm(total=args.iters, desc=f"style ({extractor.name})", disable=args.quiet, file=sys.stderr)

        def progress(step: int, terms, image) -> None:
            bar.update(1)
            if (step + 1) % SYNC_EVERY == 0:  # the terms are a device tensor: read them where the flow reads its own
                bar.set_postfix(mw2=" ".join(f"{v:.3g}" for v in terms.tolist()))
            if args.save_every and (step + 1) % args.save_every == 0:
                save_image(image[0], out / f"frame_{step + 1:05d}.png")

        result = style_transfer(content, target, features=extractor, n_components=args.k, n_iter=args.iters,
                                lr=args.lr, content_weight=args.content_weight, n_samples=args.n_samples,
                                restart_every=args.restart_every, generator=generator, callback=progress)
        bar.close()
        save_image(result.image, out / "stylised.png")
        save_image(side_by_side([content, style, result.image], height=min(512, content.shape[-2])),
                   out / "comparison.png")
        result.model.save(out / "style_gmm.pt")
        metrics = _metrics(args, device, result, content, style, t_start)
        write_json(metrics, out / "metrics.json")
    print(f"wrote stylised.png, comparison.png, style_gmm.pt and metrics.json in {args.output}/ "
          f"({extractor.name} features; patch SW2 to the style {metrics['patch_sw2_content_to_style']:.4f} -> "
          f"{metrics['patch_sw2_result_to_style']:.4f}, luminance SSIM "
          f"{metrics['luminance_ssim_result_vs_content']:.3f})")
    return 0


def _prior_model(path: Path):
    """The StyleModel of a prior.pt written by apps.fit_prior (one clear error for anything else)."""
    from imgmw.checkpoint import load_file
    from imgmw.prior import prior_from_dict
    from imgmw.style import StyleModel

    try:
        state = load_file(path, "cpu")
        return StyleModel.from_patch_prior(prior_from_dict(state), int(state["patch"]))
    except (ValueError, KeyError, TypeError) as err:
        raise AppError(f"--prior {path}: not a prior written by apps.fit_prior ({err})") from None


def _metrics(args: argparse.Namespace, device, result, content, style, t_start: float) -> dict:
    """The metrics.json record: settings, extractor, timings, per-layer losses (last step's warm-started
    values and converged-fit evaluations of the content and the result) and quality metrics."""
    import torch

    from imgmw.metrics import luminance_ssim, patch_sliced_w2
    from imgmw.style import style_distances

    layers = list(result.extractor.layers)
    dist_content, dist_result, refit = (style_distances(image, result.model, result.extractor, seed=args.seed,
                                                        fresh=fresh)
                                        for image, fresh in ((content, False), (result.image, False),
                                                             (result.image, True)))
    return {
        "settings": settings(args),
        "device": str(device),
        "extractor": result.extractor.config(),
        "layers": layers,
        "dims": list(result.extractor.dims),
        "layer_weights": result.layer_weights,
        "lr": result.lr,
        "content_weight": result.content_weight,
        "content_size_hw": list(content.shape[-2:]),
        "style_size_hw": list(style.shape[-2:]),
        "seconds_setup": result.setup_seconds,
        "seconds_optimisation": result.seconds,
        "seconds_total": time.perf_counter() - t_start,
        "first_loss_per_layer": dict(zip(layers, result.style_losses[0].tolist())),
        "final_loss_per_layer": dict(zip(layers, result.style_losses[-1].tolist())),
        "first_total_loss": float(result.losses[0]),
        "final_total_loss": float(result.losses[-1]),
        "final_loss": float((result.style_losses[-1] * torch.tensor(result.layer_weights, dtype=torch.float64)).sum()),
        "refit_mw2": float(sum(w * r for w, r in zip(result.layer_weights, refit))),
        "refit_mw2_per_layer": dict(zip(layers, refit)),
        "final_content_error": float(result.content_losses[-1]),
        "style_mw2_content_per_layer": dict(zip(layers, dist_content)),
        "style_mw2_result_per_layer": dict(zip(layers, dist_result)),
        "patch_sw2_content_to_style": patch_sliced_w2(content, style, seed=args.seed),
        "patch_sw2_result_to_style": patch_sliced_w2(result.image, style, seed=args.seed),
        "luminance_ssim_result_vs_content": luminance_ssim(result.image, content),
    }


if __name__ == "__main__":
    sys.exit(run(f"python -m apps.{NAME}", main))
