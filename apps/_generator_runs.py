"""The two kinds of run of ``apps.train_generator``: vectors (MLP) and textures (convolutional network).

Each job builds its trainer from the parsed flags, evaluates the untrained and the trained generator, writes
``samples.png`` and gives the generator's description stored in checkpoints (``spec``), from which
``apps.generate`` rebuilds the network. Imported by the app's ``main()`` only (it imports torch).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from apps._cli import AppError
from imgmw.generative import (MW2GeneratorTrainer, digit_classifier_scores, generated_sliced_w2, load_samples,
                              make_generator, nearest_train_distance, sample_grid)
from imgmw.image import load_image, resize_max, save_image, side_by_side

EVAL_SEED = 12345  # latent codes of the evaluation samples (fixed, so untrained and trained are comparable)
EVAL_SIZE = 256    # texture evaluation sample side
TIMING_SIZE = 512  # texture sampling time is measured at this side (best of TIMING_REPEATS after a warm-up)
TIMING_REPEATS = 5


class VectorJob:
    """MLP generator on ``gmm2d``, ``patches`` or ``digits`` (:class:`imgmw.generative.MW2GeneratorTrainer`)."""

    loss_label = "MW2²(fit of G(z), fit of real data)"

    def __init__(self, args: argparse.Namespace, device: torch.device, group=None) -> None:
        image = resize_max(load_image(args.image), args.max_side) if args.data == "patches" else None
        if image is not None and min(image.shape[-2:]) < args.patch:
            raise AppError(f"--image {args.image} ({image.shape[-1]}x{image.shape[-2]} after --max-side) is smaller "
                           f"than the patch size {args.patch}")
        self.data = load_samples(args.data, image=image, patch=args.patch, seed=args.seed, device=device)
        if args.target == "batch" and self.data.train.shape[0] < args.batch:
            raise AppError(f"--batch ({args.batch}) exceeds the {self.data.train.shape[0]} training samples of --data "
                           f"{args.data}; lower --batch or use --target data")
        if self.data.train.shape[0] < args.k:
            raise AppError(f"--k ({args.k}) exceeds the {self.data.train.shape[0]} training samples")
        self.args = args
        output = "sigmoid" if args.data == "digits" else "linear"
        dim = self.data.train.shape[1]
        n_codes = args.k if args.target == "components" else 0  # one-hot component codes after the noise
        net = make_generator(args.z_dim + n_codes, dim, args.hidden, seed=args.seed, output=output).to(device)
        self.spec = {"kind": "mlp", "z_dim": args.z_dim, "n_codes": n_codes, "out_dim": dim, "hidden": args.hidden,
                     "output": output, "shape": list(self.data.shape), "data": args.data, "split_seed": args.seed}
        self.trainer = MW2GeneratorTrainer(net, self.data.train, z_dim=args.z_dim, n_components=args.k,
                                           batch=args.batch, lr=args.lr, em=args.em, em_steps=args.em_steps,
                                           seed=args.seed,
                                           target=args.target, process_group=group,
                                           total_steps=args.iters if args.data == "digits" else None)
        self.m = min(args.eval_samples, self.data.test.shape[0])
        self.held_out = self.data.test[:self.m]

    def _sw2(self, samples: torch.Tensor) -> float:
        return generated_sliced_w2(samples, self.held_out, seed=self.args.seed)

    def untrained(self) -> dict[str, Any]:
        return {"sw2_untrained": self._sw2(self.trainer.sample(self.m, seed=EVAL_SEED))}

    def _refit(self, gen: torch.Generator) -> float:
        """MW2² between a fresh K-component fit of 16·K generated samples (at least the held-out count) and the
        loss's target: the data fit, or for minibatch targets a fit of the held-out samples."""
        from imgmw.flow import refit_mw2
        from imgmw.losses import fit_target

        trainer = self.trainer
        target = trainer.real_fit if trainer.target != "batch" else \
            fit_target(self.held_out, trainer.k, reg_covar=trainer.reg_covar, generator=gen)
        samples = trainer.sample(max(self.m, 16 * trainer.k), seed=EVAL_SEED)
        return float(refit_mw2(samples, target, reg_covar=trainer.reg_covar,
                               fixed_weights=trainer.target == "components",
                               generator=torch.Generator().manual_seed(self.args.seed)))

    def evaluate(self, samples_png: Path, extra: dict[str, Any]) -> dict[str, Any]:
        args, trainer, data = self.args, self.trainer, self.data
        generated = trainer.sample(self.m, seed=EVAL_SEED)
        floor_idx = torch.randperm(data.train.shape[0], generator=torch.Generator().manual_seed(args.seed))[:self.m]
        gen = torch.Generator().manual_seed(args.seed)
        metrics = {
            "dimension": data.train.shape[1], "train_samples": data.train.shape[0], "held_out_samples": self.m,
            "reg_covar": trainer.reg_covar, "warm_restarts": trainer.restarts,
            "refit_mw2": self._refit(gen),
            "sw2_untrained": extra["sw2_untrained"], "sw2_trained": self._sw2(generated),
            "sw2_real_train_vs_held_out": self._sw2(data.train[floor_idx.to(data.train.device)]),
        }
        if args.data == "digits":
            digits = trainer.sample(1000, seed=EVAL_SEED)
            metrics["digit_classifier"] = digit_classifier_scores(digits, seed=args.seed)
            metrics["nearest_train_distance"] = nearest_train_distance(digits, data.train, self.held_out)
        if len(data.shape) == 1:
            _plot_points(samples_png, self.held_out, generated)
        else:
            c, h, w = data.shape
            scale = max(1, 32 // w)
            grids = [sample_grid(s[:64], (c, h, w), columns=8, scale=scale) for s in (self.held_out, generated)]
            save_image(side_by_side(grids), samples_png)
        return metrics

    @staticmethod
    def summary(metrics: dict[str, Any]) -> str:
        text = (f"held-out sliced W2: untrained {metrics['sw2_untrained']:.4f} -> trained "
                f"{metrics['sw2_trained']:.4f}; real vs real {metrics['sw2_real_train_vs_held_out']:.4f}")
        if "digit_classifier" in metrics:
            c = metrics["digit_classifier"]
            text += (f"; classifier confidence {c['mean_max_probability']:.3f}, class entropy "
                     f"{c['entropy_ratio']:.3f}·log 10")
        return text


def _plot_points(path: Path, real, generated) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    r, g = real.cpu().numpy(), generated.cpu().numpy()
    ax.scatter(r[:, 0], r[:, 1], s=2, alpha=0.4, color="C0", label="held-out real")
    ax.scatter(g[:, 0], g[:, 1], s=2, alpha=0.4, color="C1", label="generated")
    ax.set_aspect("equal")
    ax.set_xlabel("x₁")
    ax.set_ylabel("x₂")
    ax.set_title("held-out real and generated samples")
    ax.legend(fontsize=8, markerscale=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class TextureJob:
    """Convolutional texture network against one exemplar (:class:`imgmw.texture_net.TextureGeneratorTrainer`)."""

    loss_label = "Σ_s MW2²(fit of the sample's patches, exemplar's)"

    def __init__(self, args: argparse.Namespace, device: torch.device, group=None) -> None:
        from imgmw.colour_loss import SlicedColourLoss
        from imgmw.image import is_grey
        from imgmw.patch_energy import NearestPatchEnergy
        from imgmw.texture import DEFAULT_PATCHES, PatchMW2Loss, check_patch_counts, texture_n_scales
        from imgmw.texture_net import (SEMIDUAL_IMAGE_PATCHES, SEMIDUAL_PSI_STEPS, TextureGenerator,
                                       TextureGeneratorTrainer)
        from imgmw.texture_semidual import SemiDualPatchOT
        from imgmw.texture_refine import refine_n_scales

        self.args = args
        self.exemplar = load_image(args.image).to(device)
        hw, size = (self.exemplar.shape[-2], self.exemplar.shape[-1]), (args.size, args.size)
        n_scales = texture_n_scales(hw, hw, args.patch)
        try:
            check_patch_counts(hw, size, args.patch, n_scales, args.k, DEFAULT_PATCHES, args.tileable,
                               names={"n_components": "--k", "patch": "--patch", "output": "--size",
                                      "n_patches": "patches per step", "n_scales": "scales"})
        except ValueError as err:
            raise AppError(str(err)) from None
        # a grey exemplar trains a one-channel network, whose samples are exactly grey (as texture_synth's)
        self.grey = is_grey(self.exemplar)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        self.loss = PatchMW2Loss(self.exemplar, patch=args.patch, n_components=args.k, periodic=args.tileable,
                                 generator=gen, process_group=group)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            net = TextureGenerator(channels=args.hidden, noise_channels=args.z_dim, periodic=args.tileable,
                                   out_channels=1 if self.grey else 3).to(device)
        self.spec = {"kind": "texture", "config": net.config()}
        nearest = None
        if args.nearest_weight > 0:
            self.loss_label += f" + {args.nearest_weight:g} · nearest-patch energy"
            try:
                nearest = NearestPatchEnergy(self.exemplar, n_scales=refine_n_scales(hw, size), periodic=args.tileable,
                                             generator=gen)
            except ValueError as err:
                raise AppError(f"--image {args.image}: {err} (use --nearest-weight 0)") from None
        colour = None
        if args.colour_weight > 0:
            self.loss_label += f" + {args.colour_weight:g} · sliced colour W2²"
            colour = SlicedColourLoss(self.exemplar, seed=args.seed)
        semidual = None
        if args.semidual_weight > 0:
            self.loss_label += f" + {args.semidual_weight:g} · semi-dual patch OT"
            try:
                semidual = SemiDualPatchOT(self.exemplar, gen, psi_steps=SEMIDUAL_PSI_STEPS,
                                           image_patches=SEMIDUAL_IMAGE_PATCHES, periodic=args.tileable,
                                           process_group=group)
            except ValueError as err:
                raise AppError(f"--image {args.image}: {err} (use --semidual-weight 0)") from None
        self.trainer = TextureGeneratorTrainer(net, self.loss, size=(args.size, args.size), batch=args.batch,
                                               lr=args.lr, seed=args.seed, total_steps=args.iters, process_group=group,
                                               nearest=nearest, nearest_weight=args.nearest_weight, colour=colour,
                                               colour_weight=args.colour_weight, semidual=semidual,
                                               semidual_weight=args.semidual_weight)

    def _sample(self, size: int, seed: int) -> torch.Tensor:
        net = self.trainer.net
        return net.sample(1, (size, size), torch.Generator(device=self.exemplar.device).manual_seed(seed))[0]

    def _scores(self, sample: torch.Tensor) -> dict[str, float]:
        from imgmw.metrics import near_copy_fraction, patch_sliced_w2, structure_distance

        return {"patch_sliced_w2": patch_sliced_w2(sample, self.exemplar, patch=4),
                "structure_distance": structure_distance(sample, self.exemplar),
                "near_copy_fraction": near_copy_fraction(sample, self.exemplar)}

    def untrained(self) -> dict[str, Any]:
        return {"untrained": self._scores(self._sample(EVAL_SIZE, EVAL_SEED))}

    def evaluate(self, samples_png: Path, extra: dict[str, Any]) -> dict[str, Any]:
        samples = [self._sample(EVAL_SIZE, EVAL_SEED + i) for i in range(2)]
        net = self.trainer.net
        net.sample(1, (TIMING_SIZE, TIMING_SIZE))  # warm-up (first-touch allocations, oneDNN kernel selection)
        times = []
        for _ in range(TIMING_REPEATS):
            t0 = time.perf_counter()
            net.sample(1, (TIMING_SIZE, TIMING_SIZE))
            times.append(time.perf_counter() - t0)
        shown = samples if not self.args.tileable else [samples[0].repeat(1, 2, 2)]
        save_image(side_by_side([self.exemplar, *shown]), samples_png)
        return {"exemplar_size": list(self.exemplar.shape[-2:]), "grey": self.grey, "eval_size": EVAL_SIZE,
                "untrained": extra["untrained"], "trained": self._scores(samples[0]),
                f"seconds_sample_{TIMING_SIZE}": min(times)}

    @staticmethod
    def summary(metrics: dict[str, Any]) -> str:
        t, u = metrics["trained"], metrics["untrained"]
        return (f"patch sliced-W2 {u['patch_sliced_w2']:.4f} -> {t['patch_sliced_w2']:.4f}, structure distance "
                f"{u['structure_distance']:.4f} -> {t['structure_distance']:.4f}; a {TIMING_SIZE}² sample takes "
                f"{metrics[f'seconds_sample_{TIMING_SIZE}']:.2f} s")
