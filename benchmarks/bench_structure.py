"""Does texture synthesis keep long-range structure? The structure metric on every bundled texture.

For each exemplar (``data/veins.png``, ``stripes.png``, ``bricks.png`` — the drawn structured ones — and
``wood``, ``brick``, ``gravel``, ``hubble``) the left half is the exemplar and the right half is "another crop
of the same image", the level a synthesis should reach. A texture of ``--size`` (at most the half's width) is
synthesised from the left half (:func:`imgmw.texture.synthesize_texture`, seed 0) and scored against it by

* the structure distance (:func:`imgmw.metrics.structure_distance`: RMS distance of 15×15 patches to their
  nearest exemplar patch; lower is better), printed as a ratio to the crop's (issue 12 target: <= 1.05),
* the near-copy fraction (:func:`imgmw.metrics.near_copy_fraction`), against the bound of twice the crop's
  own fraction (copies of the drawn images' exactly recurring motifs) or 0.05 where the crop has none,
* the 4×4 multi-scale patch sliced-W2 (:func:`imgmw.metrics.patch_sliced_w2`), which does not see broken
  structure but does see a wash-out to flat patches.

Rows per exemplar: the crop; ``MW2 only`` (the flow alone); ``projection always`` (the patch projection of that
same MW2 result, :func:`imgmw.texture_refine.refine_texture`, whatever it does); ``default`` (the library's default:
the projection, then the semi-dual patch OT finish of :mod:`imgmw.texture_semidual`); then each ``--variants``
setting (e.g. ``finish_colour_weight=0``); with ``--baseline-iters N`` also ``semi-dual baseline``:
``bench_texture.py``'s baseline (the multi-scale 4×4 patch semi-dual OT of Houdard et al., the same class as the
finish) run for ``N`` iterations from the default's own noise start, which tells whether the reference method
keeps the structure at this size. Times are wall seconds of the whole call (``MW2 only``: without the projection
and the finish).

Also writes ``--gallery DIR/texture_structure.png`` (exemplar | MW2 only | default per row, structured
exemplars; | baseline with ``--baseline-iters``) and, with ``--mix``, ``DIR/texture_mix.png``: stripes → veins
at mixing weights 1, ¾, ½, ¼, 0.

Usage: PYTHONPATH=. python benchmarks/bench_structure.py [--exemplars veins,stripes] [--variants
       "stages=3,n_components=8"] [--iters 300] [--baseline-iters 500] [--threads 1] [--gallery docs/gallery]
       [--mix]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data"
EXEMPLARS = "veins,stripes,bricks,wood,brick,gravel,hubble"
STRUCTURED = ("veins", "stripes", "bricks")


def _parse_variant(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        out[key.strip()] = int(value) if value.strip().isdigit() else float(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exemplars", default=EXEMPLARS, help="comma-separated names of data/*.png")
    parser.add_argument("--variants", nargs="*", default=[], help="extra settings, e.g. n_components=8,stages=3")
    parser.add_argument("--iters", type=int, default=None, help="MW2 steps (default: the library's)")
    parser.add_argument("--baseline-iters", type=int, default=0,
                        help="also run the semi-dual baseline for this many iterations (0: not)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gallery", type=Path)
    parser.add_argument("--mix", action="store_true", help="also write the stripes -> veins mixing row")
    args = parser.parse_args()
    import torch

    from imgmw.image import load_image, save_image, side_by_side
    from imgmw.metrics import near_copy_fraction, patch_sliced_w2, structure_distance
    from imgmw.texture import synthesize_texture
    from imgmw.texture_refine import refine_texture

    torch.set_num_threads(args.threads)
    if args.baseline_iters:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_texture import run_baseline
    if args.iters is None:
        from imgmw.texture import MW2_ITERS

        args.iters = MW2_ITERS
    print(f"{'exemplar':9s} {'setting':30s} {'time s':>7s} {'structure':>9s} {'/crop':>6s} {'copies':>7s} "
          f"{'bound':>6s} {'patch SW':>9s}")
    rows = []
    for name in args.exemplars.split(","):
        img = load_image(DATA / f"{name}.png")
        half = img.shape[-1] // 2
        exemplar, crop = img[:, :, :half], img[:, :, half:]
        size = (min(args.size, half), min(args.size, half))
        ref, ref_copies = structure_distance(crop, exemplar), near_copy_fraction(crop, exemplar)
        bound = 2 * ref_copies if ref_copies > 0 else 0.05

        def show(label: str, image, seconds: float | None, exemplar=exemplar, name=name, ref=ref,
                 bound=bound) -> None:
            s, c = structure_distance(image, exemplar), near_copy_fraction(image, exemplar)
            flag = "" if label.startswith("another") or c <= bound else " (over)"
            print(f"{name:9s} {label:30s} {'' if seconds is None else f'{seconds:.1f}':>7s} {s:9.4f} {s / ref:6.2f} "
                  f"{c:7.3f} {bound:6.3f} {patch_sliced_w2(image, exemplar):9.4f}{flag}", flush=True)

        show("another crop (reference)", crop, None)
        runs = {"default": {}} | {v: _parse_variant(v) for v in args.variants}
        for label, kwargs in runs.items():
            t0 = time.perf_counter()
            result = synthesize_texture(exemplar, size, diagnose=False, generator=torch.Generator().manual_seed(0),
                                        **({"n_iter": args.iters} | kwargs))
            seconds = time.perf_counter() - t0
            if label == "default":
                mw2_seconds = seconds - result.refine_seconds - result.finish_seconds
                show("MW2 only", result.unrefined, mw2_seconds)
                t1 = time.perf_counter()
                always = refine_texture(result.unrefined, exemplar, generator=torch.Generator().manual_seed(0))
                show("projection always", always, mw2_seconds + time.perf_counter() - t1)
                shown = [exemplar, result.unrefined, result.image]
                if args.baseline_iters:
                    base = run_baseline(exemplar, result.init, args.baseline_iters, args.baseline_iters, seed=0)
                    show(f"semi-dual baseline ({args.baseline_iters} it.)", base["image"], base["seconds"])
                    shown.append(base["image"])
                if name in STRUCTURED:
                    rows.append(side_by_side(shown, height=size[0]))
            how = "projection + finish" if result.finished else ("projected" if result.refined else "MW2 kept")
            show(f"{label} ({how})", result.image, seconds)
    if args.gallery:
        args.gallery.mkdir(parents=True, exist_ok=True)
        if rows:
            save_image(torch.cat(rows, dim=-2), args.gallery / "texture_structure.png")
        if args.mix:
            a, b = load_image(DATA / "stripes.png")[:, :, :128], load_image(DATA / "veins.png")[:, :, :128]
            row = [synthesize_texture([a, b], (args.size, args.size), mix=[w, 1 - w], n_iter=args.iters,
                                      diagnose=False, generator=torch.Generator().manual_seed(0)).image
                   for w in (1.0, 0.75, 0.5, 0.25, 0.0)]
            save_image(side_by_side([a, *row, b], height=args.size), args.gallery / "texture_mix.png")
        print(f"wrote {args.gallery}/texture_structure.png" + (" and texture_mix.png" if args.mix else ""))


if __name__ == "__main__":
    main()
