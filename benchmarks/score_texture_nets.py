"""Score trained texture networks as the README's texture-network table does.

For each ``apps.train_generator --data texture`` output directory: the app's own scores of its sample (from
``metrics.json``) and the mean over 256×256 samples of noise seeds 1–3 (``--seeds N``: 1–N; as
``bench_generative.py`` scores its networks), patch sliced-W2 / structure distance (:mod:`imgmw.metrics`) to the
exemplar the run was trained on, the range of the samples' patch sliced-W2, the same mean over the central 256×256
crops of 512×512 samples of the same seeds (the interior of a larger texture, far from the network's padding),
the training time and the time of a 512×512 sample (min of 5 after a warm-up, measured here). With ``--synth``,
also ``apps.texture_synth``'s default 512×512 result on the same exemplar (:func:`imgmw.texture.synthesize_texture`,
seed 0), its central 256×256 scored the same way, and the ratios of the networks' centres to it.

Usage: PYTHONPATH=. python benchmarks/score_texture_nets.py RUN_DIR [RUN_DIR ...] [--threads 1] [--seeds 3] [--synth]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SIZE = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="output directories of apps.train_generator --data texture")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=3, help="score the samples of noise seeds 1..N (default 3)")
    parser.add_argument("--synth", action="store_true", help="also score the centre of texture_synth's 512² result")
    args = parser.parse_args()
    seeds = range(1, args.seeds + 1)

    import torch

    from imgmw.generative import load_checkpoint
    from imgmw.image import load_image
    from imgmw.metrics import patch_sliced_w2, structure_distance
    from imgmw.texture import synthesize_texture
    from imgmw.texture_net import TextureGenerator

    def centre(img: torch.Tensor) -> torch.Tensor:
        """The central ``[3, SIZE, SIZE]`` of a ``[3, 2·SIZE, 2·SIZE]`` image."""
        return img[:, SIZE // 2:SIZE // 2 + SIZE, SIZE // 2:SIZE // 2 + SIZE]

    torch.set_num_threads(args.threads)
    print(f"{'run':>24} {'exemplar':>18} {'app sample':>15} {f'seeds 1-{args.seeds}':>15} {'patch SW range':>15} "
          f"{'512² centres':>15} {'training':>9} {'512² sample':>11}")
    for run in args.runs:
        metrics = json.loads((run / "metrics.json").read_text())
        state = load_checkpoint(run / "checkpoint.pt")
        net = TextureGenerator(**state["generator"]["config"])
        net.load_state_dict(state["trainer"]["net"])
        image = Path(metrics["settings"]["image"])
        exemplar = load_image(image)
        scores, centres = [], []
        for seed in seeds:
            sample = net.sample(1, (SIZE, SIZE), torch.Generator().manual_seed(seed))[0]
            scores.append((patch_sliced_w2(sample, exemplar), structure_distance(sample, exemplar)))
            middle = centre(net.sample(1, (2 * SIZE, 2 * SIZE), torch.Generator().manual_seed(seed))[0])
            centres.append((patch_sliced_w2(middle, exemplar), structure_distance(middle, exemplar)))
        psw, structure = (sum(s[i] for s in scores) / len(scores) for i in range(2))
        c_psw, c_structure = (sum(s[i] for s in centres) / len(centres) for i in range(2))
        net.sample(1, (512, 512))  # warm-up
        times = []
        for _ in range(5):
            start = time.perf_counter()
            net.sample(1, (512, 512))
            times.append(time.perf_counter() - start)
        app = metrics["trained"]
        low, high = min(s[0] for s in scores), max(s[0] for s in scores)
        print(f"{run.name:>24} {image.name:>18} {app['patch_sliced_w2']:.4f}/{app['structure_distance']:.4f}".rjust(59)
              + f" {psw:.4f}/{structure:.4f}".rjust(16) + f" {low:.4f}-{high:.4f}".rjust(16)
              + f" {c_psw:.4f}/{c_structure:.4f}".rjust(16)
              + f" {metrics['seconds_train']:>8.0f}s {min(times):>10.3f}s")
        if args.synth:
            result = synthesize_texture(exemplar, (2 * SIZE, 2 * SIZE), generator=torch.Generator().manual_seed(0))
            synth = centre(result.image)
            s_psw, s_structure = patch_sliced_w2(synth, exemplar), structure_distance(synth, exemplar)
            print(f"{'texture_synth 512² centre':>43} {s_psw:.4f}/{s_structure:.4f}; network centres / it "
                  f"{c_psw / s_psw:.2f}/{c_structure / s_structure:.2f}")


if __name__ == "__main__":
    main()
