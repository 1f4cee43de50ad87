"""Does texture synthesis keep long-range structure? The structure metric on the structured exemplars.

For each drawn exemplar (``data/veins.png``, ``stripes.png``, ``bricks.png``, 256×256) the left half is the
exemplar and the right half is "another crop of the same image", the level a synthesis should reach. A
128×128 texture is synthesised from the left half (:func:`imgmw.texture.synthesize_texture`, seed 0) with
the default settings and with each ``--variants`` setting, and scored against the exemplar by

* the structure distance (:func:`imgmw.metrics.structure_distance`: RMS distance of 15×15 patches to their
  nearest exemplar patch; lower is better, the crop's value is the reference),
* the near-copy fraction (:func:`imgmw.metrics.near_copy_fraction`),
* the 4×4 multi-scale patch sliced-W2 (:func:`imgmw.metrics.patch_sliced_w2`), which does not see broken
  structure (results score better than the crop on it).

Also writes ``--gallery DIR/texture_structure.png`` (exemplar | result per row, default settings) and, with
``--mix``, ``DIR/texture_mix.png``: stripes → veins at mixing weights 1, ¾, ½, ¼, 0.

Usage: PYTHONPATH=. python benchmarks/bench_structure.py [--variants "n_components=8" "n_components=16"]
       [--iters 300] [--threads 2] [--gallery docs/gallery] [--mix]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data"
EXEMPLARS = ("veins", "stripes", "bricks")


def _parse_variant(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        out[key.strip()] = int(value) if value.strip().isdigit() else float(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="*", default=[], help="extra settings, e.g. n_components=8,patch=8")
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gallery", type=Path)
    parser.add_argument("--mix", action="store_true", help="also write the stripes -> veins mixing row")
    args = parser.parse_args()
    import torch

    from imgmw.image import load_image, save_image, side_by_side
    from imgmw.metrics import near_copy_fraction, patch_sliced_w2, structure_distance
    from imgmw.texture import synthesize_texture

    torch.set_num_threads(args.threads)
    configs = {"default": {}} | {v: _parse_variant(v) for v in args.variants}
    print(f"{'exemplar':9s} {'setting':28s} {'time s':>7s} {'structure':>10s} {'copies':>7s} {'patch SW':>9s}")
    rows = []
    for name in EXEMPLARS:
        img = load_image(DATA / f"{name}.png")
        half = img.shape[-1] // 2
        exemplar, crop = img[:, :, :half], img[:, :, half:]
        print(f"{name:9s} {'another crop (reference)':28s} {'':>7s} {structure_distance(crop, exemplar):10.4f} "
              f"{near_copy_fraction(crop, exemplar):7.3f} {patch_sliced_w2(crop, exemplar):9.4f}")
        for label, kwargs in configs.items():
            t0 = time.perf_counter()
            settings = {"iters": args.iters} | kwargs
            result = synthesize_texture(exemplar, (args.size, args.size), diagnose=False,
                                        generator=torch.Generator().manual_seed(0), **settings).image
            seconds = time.perf_counter() - t0
            print(f"{name:9s} {label:28s} {seconds:7.1f} {structure_distance(result, exemplar):10.4f} "
                  f"{near_copy_fraction(result, exemplar):7.3f} {patch_sliced_w2(result, exemplar):9.4f}", flush=True)
            if label == "default":
                rows.append(side_by_side([exemplar, result], height=args.size))
    if args.gallery:
        args.gallery.mkdir(parents=True, exist_ok=True)
        save_image(torch.cat(rows, dim=-2), args.gallery / "texture_structure.png")
        if args.mix:
            a, b = load_image(DATA / "stripes.png")[:, :, :128], load_image(DATA / "veins.png")[:, :, :128]
            row = [synthesize_texture([a, b], (args.size, args.size), mix=[w, 1 - w], iters=args.iters,
                                      diagnose=False, generator=torch.Generator().manual_seed(0)).image
                   for w in (1.0, 0.75, 0.5, 0.25, 0.0)]
            save_image(side_by_side([a, *row, b], height=args.size), args.gallery / "texture_mix.png")
        print(f"wrote {args.gallery}/texture_structure.png" + (" and texture_mix.png" if args.mix else ""))


if __name__ == "__main__":
    main()
