"""Train a generator with an EM-MW2 loss: an MLP on vectors, or a feed-forward texture network.

    python -m apps.train_generator [--data gmm2d|patches|digits] [--iters N] [--resume]
    python -m apps.train_generator --data texture --image EXEMPLAR [--size 192] [--tileable]

Vector data sets (no download): gmm2d, a ring of 8 Gaussians in 2-D; patches, 4x4 colour patches (D=48) of
--image; digits, scikit-learn's bundled 8x8 digits (D=64). The generator is an MLP z -> x trained by Adam
(imgmw.generative.MW2GeneratorTrainer) on MW2² between a fit of a generated batch and, with --target batch, a
fit of a real minibatch (the paper's scheme) or, with --target data, one fit of the whole training set.
--target components (digits' default) fits the training set once with K equal-weight components and feeds the
MLP a one-hot component code besides the noise; each step minimises the mean Gaussian W2² between the --batch/K
samples of each code and its component (a bound on MW2², no EM on the generated side) plus 64x the sliced W2²
of all --batch samples to the training set, which sees what Gaussians miss (blank backgrounds, saturated
strokes); for digits Adam's step size decays linearly over --iters (600 by default: 2000 steps scored lower,
see the README). Quality: sliced W2 between generated and
held-out real samples; for digits also a logistic-regression classifier's confidence and class spread
(trained on the real training digits).

--data texture trains a multi-scale convolutional texture network (imgmw.texture_net) with the multi-scale
patch MW2 loss of apps.texture_synth against --image; apps.generate then samples any size in one pass. A grey
--image (three equal channels) trains a one-channel network whose samples are grey, as texture_synth's are.
Beside the MW2 loss the network minimises --colour-weight (default 1000) times the sliced W2² between the
sample's pixel colours and the exemplar's (imgmw.colour_loss): the rare bright stars of a night sky and the flat
colours of stripes, which four Gaussians per scale blend away. --nearest-weight W > 0 adds W times the
nearest-exemplar-patch energy (imgmw.patch_energy: mean squared distance of the sample's 8x8 patches, at up to 3
pyramid levels, to their nearest exemplar patches): it keeps stripes connected where the Gaussians break them, at
about 1.6x the time per step (data/stripes.png: --colour-weight 100 --nearest-weight 400, see the README).
--semidual-weight (default 5) adds that times the multi-scale patch semi-dual OT of imgmw.texture_semidual (the
semi-dual finish of apps.texture_synth, Houdard et al.'s texture-network loss): its duals share the sample's
patches out evenly over 2000 exemplar patches per scale, which keeps long structures (mortar lines, bands) that
four Gaussians per scale blur; training takes about 1.6x as long (see the README).

Under torchrun (torchrun --standalone --nproc_per_node N -m apps.train_generator ...) the network is wrapped in
DistributedDataParallel: every process generates --batch samples from its own noise, the MW2 loss fits the
samples of all processes together (all-reduced EM statistics) and rank 0 writes the outputs (vector data sets
need --target data).

Writes under --output (default outputs/train_generator/): checkpoint.pt (--resume continues from it up to
--iters steps in total; with --save-every N it is also written there every N steps, atomically, so a killed
run loses at most N steps), samples.png, loss.png and metrics.json.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from apps._cli import (AppError, AppParser, Interrupted, add_common_args, non_negative_float, positive_float,
                       positive_int, process_group_for, read_resume_checkpoint, run, settings, staged_output,
                       write_json)

NAME = "train_generator"
DATA = Path(__file__).resolve().parent.parent / "data"
CHECKPOINT = "checkpoint.pt"
DEFAULTS = {  # per data set: iters, k, batch, em, target, hidden, z_dim, lr (texture: size and the terms' weights)
    "gmm2d": dict(iters=1500, k=8, batch=512, em="warm", target="batch", hidden=128, z_dim=8, lr=1e-3),
    "patches": dict(iters=1500, k=4, batch=512, em="unrolled", target="batch", hidden=128, z_dim=8, lr=1e-3),
    "digits": dict(iters=600, k=128, batch=4096, em="warm", target="components", hidden=256, z_dim=16, lr=3e-3),
    "texture": dict(iters=1500, k=4, batch=1, em="warm", target="data", hidden=8, z_dim=3, lr=5e-3, size=192,
                    colour_weight=1000.0, semidual_weight=5.0),
}
# Settings a checkpoint must share with the command line to be resumed (the texture ones only for --data texture:
# vector runs ignore them, and older vector checkpoints recorded --size 128).
RESUME_KEYS = ("data", "image", "patch", "max_side", "k", "batch", "lr", "z_dim", "hidden", "em", "em_steps", "seed",
               "target")
TEXTURE_RESUME_KEYS = ("size", "tileable")


def build_parser() -> argparse.ArgumentParser:
    p = AppParser(prog=f"python -m apps.{NAME}", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="gmm2d", choices=tuple(DEFAULTS), help="data set (default gmm2d)")
    p.add_argument("--image", type=Path, default=DATA / "wood.png",
                   help="--data patches / texture: the image (default data/wood.png)")
    p.add_argument("--patch", type=positive_int, default=4, help="--data patches / texture: patch side (default 4)")
    p.add_argument("--max-side", type=positive_int, default=64,
                   help="--data patches: the image is downscaled to this longest side (default 64)")
    p.add_argument("--k", type=positive_int, help="mixture components (gmm2d 8, patches 4, digits 128, texture 4)")
    p.add_argument("--batch", type=positive_int, help="generated (and real) batch (512; digits 4096; texture 1)")
    p.add_argument("--lr", type=positive_float, help="Adam step size (default 1e-3; texture 5e-3; digits 3e-3)")
    p.add_argument("--z-dim", type=positive_int, help="latent dimension (default 8; digits 16; texture channels 3)")
    p.add_argument("--hidden", type=positive_int,
                   help="width of the MLP's 3 hidden layers (default 128; digits 256); texture: channels added per "
                        "scale (default 8)")
    p.add_argument("--target", choices=("batch", "data", "components"), help="vector data: fit a real minibatch per "
                   "step (default), the whole training set once, or that plus component codes (digits; see above)")
    p.add_argument("--em", choices=("warm", "unrolled"),
                   help="--target batch: fit of the generated batch, warm = EM steps from the previous step's fit "
                        "(gmm2d), unrolled = k-means++ and EM steps, differentiated through all (patches)")
    p.add_argument("--em-steps", type=positive_int, help="--target batch: differentiable EM steps per fit (1 or 5)")
    p.add_argument("--size", type=positive_int, help="--data texture: side of the training samples (default 192)")
    p.add_argument("--tileable", action="store_true", help="--data texture: circular padding, samples tile")
    p.add_argument("--nearest-weight", type=non_negative_float, default=0.0,
                   help="--data texture: weight of the nearest-exemplar-patch energy beside the MW2 loss (default 0: "
                        "the MW2 loss alone; 100-400 for exemplars with long straight structures, see the README)")
    p.add_argument("--colour-weight", type=non_negative_float,
                   help="--data texture: weight of the sliced W2² between the sample's and the exemplar's pixel "
                        "colours beside the MW2 loss (default 1000; 0: the MW2 loss alone)")
    p.add_argument("--semidual-weight", type=non_negative_float,
                   help="--data texture: weight of the multi-scale patch semi-dual OT term (imgmw.texture_semidual) "
                        "beside the MW2 loss (default 5; 0: the MW2 and colour terms alone)")
    p.add_argument("--eval-samples", type=positive_int, default=2000,
                   help="generated and held-out samples of the sliced-W2 evaluation (default 2000)")
    p.add_argument("--resume", action="store_true", help=f"continue from OUTPUT/{CHECKPOINT} up to --iters steps")
    add_common_args(p, NAME, iters=None, iters_help="training steps (default 1500; digits 600)")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.data in ("patches", "texture"):
        if not args.image.exists():
            raise AppError(f"--image {args.image} does not exist")
        if args.image.is_dir():
            raise AppError(f"--image {args.image} is a directory, not an image file")
    if args.resume and not (args.output / CHECKPOINT).is_file():
        raise AppError(f"--resume: no checkpoint at {args.output / CHECKPOINT}")
    for key, value in DEFAULTS[args.data].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for flag in ("colour_weight", "semidual_weight"):  # a texture network's terms only
        if getattr(args, flag) is None:
            setattr(args, flag, 0.0)
    args.em_steps = (1 if args.em == "warm" else 5) if args.em_steps is None else args.em_steps
    if args.data != "texture" and args.target != "data" and args.batch < args.k * (1 + (args.target == "components")):
        raise AppError(f"--batch ({args.batch}) must be at least --k ({args.k}), twice that with --target components")
    if args.data == "texture" and (args.size % 16 or (args.tileable and args.size < 32)):
        raise AppError(f"--size {args.size} must be a multiple of 16 (the network's 5 noise scales), at least 32 "
                       "with --tileable")


def _resume(trainer, path: Path, args: argparse.Namespace, device, group) -> dict[str, Any]:
    """Load the checkpoint into ``trainer``; returns its ``extra`` dict. Refuses other settings, and under
    torchrun another number of processes (each rank continues its own noise stream)."""
    from imgmw.distributed import rank, world_size

    keys = RESUME_KEYS + TEXTURE_RESUME_KEYS if args.data == "texture" else RESUME_KEYS
    state = read_resume_checkpoint(path, args, ("trainer", "extra"), keys, device)
    # a flag absent from the checkpoint's settings was added after it was written: trained without the term
    for flag in ("nearest_weight", "colour_weight", "semidual_weight"):
        if state["settings"].get(flag, 0.0) != getattr(args, flag):
            raise AppError(f"--resume: checkpoint {path} was trained with different --{flag.replace('_', '-')}")
    trainer.load_state_dict(state["trainer"])
    per_rank = state.get("rng_per_rank")
    if group is not None:
        if per_rank is None or len(per_rank) != world_size(group):
            raise AppError(f"--resume: checkpoint {path} was written by {1 if per_rank is None else len(per_rank)} "
                           f"process(es); resume it with as many, not {world_size(group)}")
        trainer.rng.set_state(per_rank[rank(group)].clone())  # set_state crashes on a view into a larger storage
    return dict(state["extra"])


def _plot_loss(path: Path, history: list[float], label: str) -> None:
    from apps._plots import Panel, plot_panels

    plot_panels(path, [Panel({"loss": history}, label, title="training loss", log_y=True,
                             smooth=max(1, len(history) // 50))], xlabel="training step")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    with process_group_for(args.device) as (group, device):
        return _train(args, group, device)


def _train(args: argparse.Namespace, group, device) -> int:
    from tqdm import tqdm

    from apps import _generator_runs as runs
    from imgmw.distributed import all_gather_stack, rank, world_size
    from imgmw.generative import save_checkpoint

    if group is not None and args.data != "texture" and args.target != "data":
        raise AppError("under torchrun the vector generators need --target data (real minibatch fits are per process)")
    main_rank = rank(group) == 0
    t_start = time.perf_counter()
    job = runs.TextureJob(args, device, group) if args.data == "texture" else runs.VectorJob(args, device, group)
    trainer = job.trainer
    ckpt = args.output / CHECKPOINT
    extra = _resume(trainer, ckpt, args, device, group) if args.resume else (job.untrained() if main_rank else {})
    start = trainer.step_count

    def checkpoint_state() -> dict[str, Any]:
        state: dict[str, Any] = {"trainer": trainer.state_dict(), "settings": settings(args), "extra": extra,
                                 "generator": job.spec}
        if group is not None:  # every rank's noise generator, so that a resumed run draws what this one would
            state["rng_per_rank"] = [t.clone() for t in all_gather_stack(trainer.rng.get_state(), group)]
        return state

    with staged_output(args.output) if main_rank else contextlib.nullcontext() as out:
        bar = tqdm(total=args.iters, initial=min(start, args.iters), desc="train", disable=args.quiet or not main_rank,
                   file=sys.stderr)
        saved: list[int] = []

        def progress(step: int, loss: float, _) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3g}")
            if args.save_every and (step + 1) % args.save_every == 0:
                state = checkpoint_state()
                if main_rank:
                    args.output.mkdir(parents=True, exist_ok=True)
                    save_checkpoint(ckpt, state)
                saved.append(step + 1)

        t_train = time.perf_counter()
        try:
            trainer.train(max(0, args.iters - start), progress)
        except KeyboardInterrupt:
            if not saved:
                raise
            raise Interrupted(f"{ckpt} holds step {saved[-1]}; continue with --resume") from None
        bar.close()
        t_train = time.perf_counter() - t_train
        state = checkpoint_state()
        if out is None:  # not rank 0: the main rank writes the outputs
            return 0
        save_checkpoint(out / CHECKPOINT, state)
        metrics = {"settings": settings(args), "device": str(device), "processes": world_size(group),
                   "resumed_from_step": start, "steps": trainer.step_count, "seconds_train": t_train,
                   "final_loss": trainer.history[-1] if trainer.history else None,
                   "final_loss_mean_last_50": (sum(trainer.history[-50:]) / len(trainer.history[-50:])
                                               if trainer.history else None),
                   **job.evaluate(out / "samples.png", extra)}
        metrics["seconds_total"] = time.perf_counter() - t_start
        _plot_loss(out / "loss.png", trainer.history, job.loss_label)
        write_json(metrics, out / "metrics.json")
    print(f"wrote {CHECKPOINT}, samples.png, loss.png and metrics.json in {args.output}/ ({job.summary(metrics)})")
    return 0


if __name__ == "__main__":
    sys.exit(run(f"python -m apps.{NAME}", main))
