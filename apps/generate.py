"""Sample a generator trained by apps.train_generator, in one forward pass.

    python -m apps.generate CHECKPOINT [--size 512 | --size 640x360] [--n 4] [--seed 0] [--tileable]
    python -m apps.generate CHECKPOINT --n 1000            # a vector generator (digits, patches, gmm2d)

Texture checkpoints (--data texture): writes sample_000.png ... (any --size; --tileable needs a checkpoint
trained with --tileable and sides divisible by 16, and also writes tiled_000.png, a 2x2 tiling). Vector
checkpoints: writes samples.pt ([n, *shape] in the data's range, e.g. [n, 1, 8, 8] for digits) and samples.png
(a grid of the first 64, or a scatter plot for 2-D points). Always writes metrics.json (settings, seconds).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from apps._cli import AppError, AppParser, check_input_file, positive_int, resolve_device, run, seed, staged_output, \
    write_json

PROG = "generate"


def build_parser() -> argparse.ArgumentParser:
    p = AppParser(prog=f"python -m apps.{PROG}", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="checkpoint.pt written by apps.train_generator")
    p.add_argument("--size", default="512", help="texture checkpoints: N (N×N) or WxH (default 512)")
    p.add_argument("--n", type=positive_int, help="number of samples (default: 1 texture, 1000 vectors)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the noise (same seed, same samples on one device)")
    p.add_argument("--tileable", action="store_true", help="texture checkpoints trained with --tileable: also write a 2x2 tiling")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to compute")
    p.add_argument("--output", type=Path, default=Path("outputs") / PROG, help=f"output directory (default outputs/{PROG})")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    return p


def _load(path: Path, device) -> dict[str, Any]:
    """The checkpoint's dict, with a clear error for anything that is not an apps.train_generator checkpoint."""
    from imgmw.generative import load_checkpoint

    state = load_checkpoint(path, map_location=device)
    if not isinstance(state, dict) or "generator" not in state or "trainer" not in state \
            or not isinstance(state["generator"], dict) or state["generator"].get("kind") not in ("mlp", "texture"):
        raise AppError(f"{path} is not a generator checkpoint of apps.train_generator (no generator description)")
    return state


def _network(state: dict[str, Any], path: Path, device):
    from imgmw.generative import make_generator
    from imgmw.texture_net import TextureGenerator

    spec = state["generator"]
    try:
        if spec["kind"] == "texture":
            net = TextureGenerator(**spec["config"])
        else:
            net = make_generator(spec["z_dim"], spec["out_dim"], spec["hidden"], output=spec["output"])
        net.load_state_dict(state["trainer"]["net"])
    except (KeyError, TypeError, RuntimeError, ValueError) as err:
        raise AppError(f"{path}: the generator's weights do not load ({type(err).__name__}: "
                       f"{str(err).splitlines()[0]})") from None
    return net.to(device).eval()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_input_file(args.checkpoint, "checkpoint")

    import torch

    from imgmw.image import parse_size, save_image

    device = resolve_device(args.device)
    state = _load(args.checkpoint, device)
    net = _network(state, args.checkpoint, device)
    spec = state["generator"]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    texture = spec["kind"] == "texture"
    if texture:
        try:
            size = parse_size(args.size)
            net.noise_shape(size)
        except ValueError as err:
            raise AppError(f"--size {args.size}: {err}") from None
        if args.tileable and not net.periodic:
            raise AppError(f"--tileable: {args.checkpoint} was not trained with --tileable")
    elif args.tileable:
        raise AppError("--tileable applies to texture checkpoints only")
    n = args.n or (1 if texture else 1000)
    start = time.perf_counter()
    with torch.no_grad():
        if texture:
            samples = net.sample(n, size, gen)
        else:
            z = torch.randn(n, spec["z_dim"], generator=gen, device=device)
            samples = net(z).reshape(n, *spec["shape"])
    seconds = time.perf_counter() - start
    with staged_output(args.output) as out:
        if texture:
            for i, image in enumerate(samples):
                save_image(image, out / f"sample_{i:03d}.png")
                if args.tileable:
                    save_image(image.repeat(1, 2, 2), out / f"tiled_{i:03d}.png")
        else:
            from imgmw.checkpoint import save_atomic

            save_atomic(samples.cpu(), out / "samples.pt")
            _picture(samples, spec, out / "samples.png")
        write_json({"checkpoint": str(args.checkpoint), "kind": spec["kind"], "n": n, "seed": args.seed,
                    "shape": list(samples.shape[1:]), "seconds_sampling": seconds, "device": str(device)},
                   out / "metrics.json")
    if not args.quiet:
        print(f"{PROG}: {n} sample(s) of shape {tuple(samples.shape[1:])} in {seconds:.3f} s; wrote {args.output}/")
    return 0


def _picture(samples, spec: dict[str, Any], path: Path) -> None:
    """A grid of the first 64 image-shaped samples, or a scatter plot of 2-D points."""
    from imgmw.generative import sample_grid
    from imgmw.image import save_image

    if len(spec["shape"]) == 1:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        xy = samples.reshape(samples.shape[0], -1)[:, :2].cpu().numpy()
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(xy[:, 0], xy[:, 1], s=2)
        ax.set_aspect("equal")
        ax.set_xlabel("x₁")
        ax.set_ylabel("x₂")
        ax.set_title(f"{samples.shape[0]} generated samples")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    shape = tuple(spec["shape"])
    flat = samples[:64].reshape(min(64, samples.shape[0]), -1)
    save_image(sample_grid(flat, shape, columns=8, scale=max(1, 32 // shape[-1])), path)


if __name__ == "__main__":
    sys.exit(run(f"python -m apps.{PROG}", main))
