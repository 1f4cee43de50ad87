"""Generators trained with MW2 against the same generators trained with other losses, at equal training time.

Texture (per exemplar): the same :class:`imgmw.texture_net.TextureGenerator` (same seed, 192×192 training
samples, Adam lr 5e-3 decayed linearly in time to ``LR_FLOOR`` of it, fresh noise every step) trained for
``--seconds`` of wall time with
  * **mw2**: :class:`imgmw.texture.PatchMW2Loss` plus ``COLOUR_WEIGHT`` × :class:`imgmw.colour_loss.SlicedColourLoss`
    plus ``SEMIDUAL_WEIGHT`` × the semi-dual patch OT term with the trainer's settings (2 ψ steps, 2048 patches per
    scale and step): the app's default loss, what ``apps.train_generator --data texture`` trains;
  * **sliced**: multi-scale patch sliced W2 (4×4 patches, 4 scales, 4096 random patches of the sample and of
    the exemplar per scale and step, 64 random directions per step), the loss of sliced-Wasserstein texture
    networks;
  * **semidual**: the multi-scale patch semi-dual OT loss of ``bench_texture.py`` (its ψ ascent then the loss
    on the generated image), as in Houdard et al.'s wgenpatex generator.
Each is scored on a 256×256 sample (fixed noise) by 4×4 patch sliced-W2 and the structure distance
(:mod:`imgmw.metrics`), beside ``apps.texture_synth``'s optimisation result on the same exemplar
(:func:`imgmw.texture.synthesize_texture` defaults): the issue's bound is 1.2× of it on both. The time of a
512×512 sample (best of 5 after a warm-up) is printed for the mw2 network. A grey exemplar trains one-channel
networks (``out_channels=1``), as the app does.

Digits: the same MLP (z=16, 3×256, sigmoid; Adam, step size decayed linearly over the time budget) trained for
``--seconds`` with
  * **components**: the app's default (``apps.train_generator --data digits``): K=128 equal-weight components fitted
    to the training digits, a one-hot component code beside the noise, 32 generated digits per code and step, the
    Gaussian W2² of each code's digits to its component (:func:`imgmw.generative.component_w2_loss`) plus 64× the
    sliced W2² of all 4096 to the training digits (``MW2GeneratorTrainer.data_sliced_w2``), lr 3e-3;
  * **gaussian**: the same without the sliced term (``sliced_weight=0``);
  * **mw2**: the MW2 loss against one fit of the training digits (K=32, 4096 generated digits per step,
    ``--target data``), lr 3e-3;
  * **sliced**: the sliced W2 between 4096 generated and 4096 real digits (64 directions per step), lr 3e-3;
scored on 1000 samples (codes from seed 1) by the logistic-regression classifier
(:func:`imgmw.generative.digit_classifier_scores`), held-out sliced W2 and the mean distance to the nearest
training digit (:func:`imgmw.generative.nearest_train_distance`; held-out real digits: 1.06).

Usage: PYTHONPATH=. python benchmarks/bench_generative.py [--seconds 150] [--exemplars wood,brick,gravel]
       [--threads 2] [--skip-digits] [--skip-texture]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_texture import SCALES, SemiDualPatchOT  # noqa: E402  (the baseline of the optimisation benchmark)

PATCH = 4
TRAIN_SIZE = 192  # apps.train_generator --data texture's training size
EVAL_SIZE = 256
SW_PATCHES = 4096
SW_DIRECTIONS = 64
LR = 5e-3  # the texture network's step size, as apps.train_generator --data texture
COLOUR_WEIGHT = 1000.0  # the sliced colour term's weight, as apps.train_generator --data texture
SEMIDUAL_WEIGHT = 5.0  # the semi-dual term's weight, as apps.train_generator --data texture
DIGITS_LR = 3e-3


def _sliced(x: torch.Tensor, y: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Sliced W2² between equally many points ``x, y [n, D]`` along ``theta [D, P]``."""
    return ((x @ theta).sort(0).values - (y @ theta).sort(0).values).square().mean()


class SlicedPatchLoss:
    """Multi-scale patch sliced W2² of an image batch ``[1, 3, H, W]`` to an exemplar."""

    def __init__(self, exemplar: torch.Tensor, generator: torch.Generator) -> None:
        from imgmw.patches import gaussian_pyramid

        self.levels = gaussian_pyramid(exemplar[None], SCALES)
        self.generator = generator

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        from imgmw.patches import gaussian_pyramid, patch_grid, random_patches

        total = image.new_zeros(())
        for level, target in zip(gaussian_pyramid(image, SCALES), self.levels):
            n = min(SW_PATCHES, *(r * c for r, c in (patch_grid(*level.shape[-2:], PATCH),
                                                     patch_grid(*target.shape[-2:], PATCH))))
            x = random_patches(level, PATCH, n, self.generator)[0]
            y = random_patches(target, PATCH, n, self.generator)[0]
            theta = torch.randn(x.shape[1], SW_DIRECTIONS, generator=self.generator)
            total = total + _sliced(x, y, theta / theta.norm(dim=0))
        return total


def _texture_loss(kind: str, exemplar: torch.Tensor, seed: int):
    from imgmw.colour_loss import SlicedColourLoss
    from imgmw.texture import PatchMW2Loss
    from imgmw.texture_net import SEMIDUAL_IMAGE_PATCHES, SEMIDUAL_PSI_STEPS

    gen = torch.Generator().manual_seed(seed)
    if kind == "mw2":
        mw2, colour = PatchMW2Loss(exemplar, patch=PATCH, generator=gen), SlicedColourLoss(exemplar, seed=seed)
        semidual = SemiDualPatchOT(exemplar, gen, psi_steps=SEMIDUAL_PSI_STEPS,
                                   image_patches=SEMIDUAL_IMAGE_PATCHES).loss
        return lambda image: mw2(image) + COLOUR_WEIGHT * colour(image) + SEMIDUAL_WEIGHT * semidual(image)
    return SlicedPatchLoss(exemplar, gen) if kind == "sliced" else SemiDualPatchOT(exemplar, gen).loss


def train_texture(kind: str, exemplar: torch.Tensor, seconds: float, seed: int = 0):
    from imgmw.image import is_grey
    from imgmw.texture_net import LR_FLOOR, TextureGenerator

    torch.manual_seed(seed)
    net = TextureGenerator(out_channels=1 if is_grey(exemplar) else 3)  # as apps.train_generator
    loss_fn = _texture_loss(kind, exemplar, seed)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    noise_gen = torch.Generator().manual_seed(seed)
    start, steps = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - start) < seconds:
        opt.param_groups[0]["lr"] = LR * max(LR_FLOOR, 1 - elapsed / seconds)  # the app's decay, in time
        image = net(net.noise(1, (TRAIN_SIZE, TRAIN_SIZE), noise_gen))
        opt.zero_grad(set_to_none=True)
        loss_fn(image).backward()
        opt.step()
        steps += 1
    return net, steps


def texture_scores(image: torch.Tensor, exemplar: torch.Tensor) -> tuple[float, float]:
    from imgmw.metrics import patch_sliced_w2, structure_distance

    return patch_sliced_w2(image, exemplar, patch=PATCH), structure_distance(image, exemplar)


def bench_texture(names: list[str], seconds: float) -> None:
    from imgmw.image import load_image
    from imgmw.texture import synthesize_texture

    print(f"Texture generators, {seconds:.0f} s of training each, scored on a {EVAL_SIZE}² sample "
          "(patch-SW / structure distance, lower is better):")
    print(f"{'exemplar':>9} {'texture_synth':>15} {'mw2 net':>15} {'sliced net':>15} {'semidual net':>15} "
          f"{'mw2/synth':>10} {'512² sample':>11}")
    for name in names:
        exemplar = load_image(ROOT / "data" / f"{name}.png")
        synth = synthesize_texture(exemplar, (EVAL_SIZE, EVAL_SIZE), generator=torch.Generator().manual_seed(0))
        ref = texture_scores(synth.image, exemplar)
        row, nets = {}, {}
        for kind in ("mw2", "sliced", "semidual"):
            net, steps = train_texture(kind, exemplar, seconds)
            nets[kind] = net
            sample = net.sample(1, (EVAL_SIZE, EVAL_SIZE), torch.Generator().manual_seed(1))[0]
            row[kind] = (*texture_scores(sample, exemplar), steps)
        nets["mw2"].sample(1, (512, 512))  # warm-up
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            nets["mw2"].sample(1, (512, 512))
            times.append(time.perf_counter() - t0)
        cells = " ".join(f"{row[k][0]:.4f}/{row[k][1]:.4f}".rjust(15) for k in ("mw2", "sliced", "semidual"))
        ratio = f"{row['mw2'][0] / ref[0]:.2f}/{row['mw2'][1] / ref[1]:.2f}"
        print(f"{name:>9} {ref[0]:.4f}/{ref[1]:.4f}".rjust(25) + f" {cells} {ratio:>10} {min(times):>10.2f}s")
        print(f"{'':>9} training steps: " + ", ".join(f"{k} {row[k][2]}" for k in row))


def bench_digits(seconds: float) -> None:
    from imgmw.generative import (MW2GeneratorTrainer, digit_classifier_scores, generated_sliced_w2, load_samples,
                                  make_generator, nearest_train_distance, truncated_latent)

    data = load_samples("digits", seed=0)
    print(f"Digits generators, {seconds:.0f} s of training each (classifier confidence / class entropy over "
          "log 10 / held-out sliced W2 / nearest training digit; real vs real sliced W2 "
          f"{generated_sliced_w2(data.train[:data.test.shape[0]], data.test):.4f}):")
    for kind in ("components", "gaussian", "mw2", "sliced"):
        coded = kind in ("components", "gaussian")
        k = 128 if coded else 32
        net = make_generator(16 + (k if coded else 0), 64, 256, seed=0, output="sigmoid")
        start, steps = time.perf_counter(), 0
        if kind != "sliced":
            trainer = MW2GeneratorTrainer(net, data.train, z_dim=16, n_components=k, batch=4096, lr=DIGITS_LR, seed=0,
                                          target="components" if coded else "data",
                                          sliced_weight=0.0 if kind != "components" else None)
            opt = trainer.optimizer
        else:
            opt = torch.optim.Adam(net.parameters(), lr=DIGITS_LR)
            gen = torch.Generator().manual_seed(0)
        while (elapsed := time.perf_counter() - start) < seconds:
            opt.param_groups[0]["lr"] = DIGITS_LR * max(0.05, 1 - elapsed / seconds)  # the app's decay, in time
            if kind != "sliced":
                trainer.step()
            else:
                x = net(torch.randn(4096, 16, generator=gen))
                y = data.train[torch.randint(data.train.shape[0], (4096,), generator=gen)]
                theta = torch.randn(64, SW_DIRECTIONS, generator=gen)
                opt.zero_grad(set_to_none=True)
                _sliced(x, y, theta / theta.norm(dim=0)).backward()
                opt.step()
            steps += 1
        with torch.no_grad():
            samples = net(truncated_latent(1000, 16, n_codes=k if coded else 0,
                                           generator=torch.Generator().manual_seed(1)))
        s = digit_classifier_scores(samples)
        sw = generated_sliced_w2(samples[:data.test.shape[0]], data.test)
        near = nearest_train_distance(samples, data.train, data.test)["generated"]
        print(f"{kind:>10}: {s['mean_max_probability']:.3f} / {s['entropy_ratio']:.3f} / {sw:.4f} / {near:.2f} "
              f"({steps} steps)")
    print(f"{'real':>10}: {s['real_held_out_mean_max_probability']:.3f} / {s['real_held_out_entropy_ratio']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=150.0, help="training time of every generator")
    parser.add_argument("--exemplars", default="wood,brick,gravel", help="comma-separated names under data/")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--skip-texture", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_texture:
        bench_texture(args.exemplars.split(","), args.seconds)
    if not args.skip_digits:
        bench_digits(args.seconds)


if __name__ == "__main__":
    main()
