"""Train EM as a neural operator (:class:`imgmw.layers.EMLayer`) on synthetic Gaussian-mixture data sets.

Training and the held-out comparison are :mod:`imgmw.layer_training`: plain EM with T steps | the trained
layer with T steps | plain EM with 10·T steps, all from the same k-means++ start per set, by the mean
log-likelihood per point, and the fraction of the gap between the two plain-EM rows that the layer closes.

Outputs (under ``--output``, default ``outputs/em_operator/``): ``checkpoint.pt`` (written atomically;
``--resume`` continues training from it up to ``--train-steps``), ``loss.png`` (training loss and the
layer's gain over plain EM, with the held-out levels) and ``metrics.json`` (settings, timings, the table).

Example: ``python -m apps.em_operator --k 4 --dim 2 --iters 3 --train-steps 600``
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from apps._cli import (AppError, AppParser, DefaultsHelpFormatter, Interrupted, check_output, non_negative_int,
                       positive_float, positive_int, read_resume_checkpoint, resolve_device, run, seed, settings,
                       staged_output, write_json)

PROG = "em_operator"
CHECKPOINT = "checkpoint.pt"
# Settings that must match between a checkpoint and the flags for --resume.
ARCH_KEYS = ("k", "dim", "iters", "hidden", "n_points", "batch", "lr", "seed", "residual_every_step")


def build_parser() -> argparse.ArgumentParser:
    p = AppParser(prog=f"python -m apps.{PROG}", description=__doc__.split("\n\n")[0],
                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--k", type=positive_int, default=4, help="components K of the mixtures and of the layer")
    p.add_argument("--dim", type=positive_int, default=2, help="dimension D of the points")
    p.add_argument("--n-points", type=positive_int, default=256, help="points N per data set")
    p.add_argument("--iters", type=positive_int, default=3, help="unrolled EM steps T of the layer")
    p.add_argument("--train-steps", type=non_negative_int, default=1000, help="total optimiser steps")
    p.add_argument("--batch", type=positive_int, default=32, help="data sets per training step")
    p.add_argument("--lr", type=positive_float, default=1e-2, help="Adam learning rate (cosine-decayed to 0)")
    p.add_argument("--hidden", type=positive_int, default=64, help="hidden width of the correction MLPs")
    p.add_argument("--final-only", dest="residual_every_step", action="store_false",
                   help="correct only after the last EM step instead of after every step")
    p.add_argument("--eval-sets", type=positive_int, default=256, help="held-out data sets")
    p.add_argument("--save-every", type=non_negative_int, default=0,
                   help="also checkpoint every N steps (0: at the end only)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the weights and of the training stream")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="CPU threads for torch (the per-step tensors are small: more threads mostly add overhead)")
    p.add_argument("--output", type=Path, default=Path("outputs") / PROG)
    p.add_argument("--resume", action="store_true", help=f"continue from OUTPUT/{CHECKPOINT}")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.n_points < args.k:
        raise AppError(f"--n-points ({args.n_points}) must be >= --k ({args.k})")
    check_output(args.output)
    if args.resume and not (args.output / CHECKPOINT).is_file():
        raise AppError(f"--resume: no checkpoint at {args.output / CHECKPOINT}")


# --------------------------------------------------------------------------- model and checkpoint
def build(args: argparse.Namespace, device):
    """The layer (its k-means++ start given per set, the same for every row of the table) and its trainer."""
    import torch

    from imgmw.layer_training import LayerTrainer
    from imgmw.layers import EMLayer

    torch.manual_seed(args.seed)
    layer = EMLayer(args.k, args.dim, args.iters, init="given", hidden=args.hidden,
                    residual_every_step=args.residual_every_step).to(device)
    return LayerTrainer(layer, n_points=args.n_points, batch=args.batch, lr=args.lr, total_steps=args.train_steps,
                        seed=args.seed)


def save_checkpoint(path: Path, trainer, args: argparse.Namespace) -> None:
    """Write the training state and the flags to ``path`` atomically (:func:`imgmw.checkpoint.save_atomic`)."""
    from imgmw.checkpoint import save_atomic

    save_atomic({**trainer.state_dict(), "settings": settings(args)}, path)


def load_checkpoint(path: Path, trainer, args: argparse.Namespace) -> None:
    """Restore :func:`save_checkpoint`'s state into ``trainer``; ``AppError`` for another file or other settings
    in ``ARCH_KEYS`` (``--train-steps`` may differ: the cosine schedule then continues with the new total)."""
    state = read_resume_checkpoint(path, args, ("model", "optimizer", "scheduler", "step", "history"), ARCH_KEYS,
                                   trainer.device)
    try:
        trainer.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise AppError(f"--resume: {path} does not fit this model ({str(err).strip().splitlines()[0]})") from None


# --------------------------------------------------------------------------- training and evaluation
def train(trainer, args: argparse.Namespace, ckpt: Path, saved: list[int]) -> None:
    """Steps up to ``--train-steps`` with a progress bar; the steps of the periodic checkpoints written to
    ``ckpt`` are appended to ``saved``."""
    from tqdm import tqdm

    bar = tqdm(total=args.train_steps, initial=trainer.step_count, disable=args.quiet, desc="train",
               dynamic_ncols=True)
    while trainer.step_count < args.train_steps:
        loss = trainer.step()
        bar.update()
        bar.set_postfix(loss=f"{loss:.4f}", gain_vs_em=f"{trainer.recent_gain():+.4f}")
        if args.save_every and trainer.step_count % args.save_every == 0:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint(ckpt, trainer, args)
            saved.append(trainer.step_count)
    bar.close()


def print_table(table: dict[str, float], iters: int) -> None:
    rows = [(f"plain EM, T={iters}", table["em_T"]), (f"EM layer (trained), T={iters}", table["layer_T"]),
            (f"plain EM, T={10 * iters}", table["em_10T"])]
    print(f"{'held-out, k-means++ init':<30} {'mean log-lik / point':>21}")
    for name, value in rows:
        print(f"{name:<30} {value:>21.4f}")
    print(f"{'gap closed by training':<30} {100 * table['gap_closed']:>20.1f}%")


def save_plot(path: Path, trainer, table: dict[str, float], iters: int) -> None:
    """Training loss (top) and the layer's gain over plain EM on the same batches (bottom)."""
    from apps._plots import Panel, plot_panels

    window = max(1, len(trainer.history) // 30)
    gain = [e - v for e, v in zip(trainer.em_history, trainer.history)]
    plot_panels(path, [
        Panel({"loss (NLL per point)": trainer.history}, "training loss", smooth=window,
              title=f"EMLayer (T={iters}) against plain EM from the same k-means++ starts"),
        Panel({"training batches": gain}, f"log-lik / point over EM T={iters}", smooth=window,
              lines={f"held-out: trained layer, T={iters}": table["layer_T"] - table["em_T"],
                     f"held-out: plain EM, T={10 * iters}": table["em_10T"] - table["em_T"],
                     f"plain EM, T={iters}": 0.0})], xlabel="optimiser step")


def _run(args: argparse.Namespace, device) -> int:
    from imgmw.layer_training import evaluate

    clock = [(time.perf_counter(), time.process_time())]
    trainer = build(args, device)
    ckpt = args.output / CHECKPOINT
    if args.resume:
        load_checkpoint(ckpt, trainer, args)
    start = trainer.step_count
    clock.append((time.perf_counter(), time.process_time()))
    with staged_output(args.output) as out:
        saved: list[int] = []
        try:
            train(trainer, args, ckpt, saved)
        except KeyboardInterrupt:
            if not saved:
                raise
            raise Interrupted(f"{ckpt} holds step {saved[-1]}; continue with --resume") from None
        save_checkpoint(out / CHECKPOINT, trainer, args)
        clock.append((time.perf_counter(), time.process_time()))
        table = evaluate(trainer.layer, n_points=args.n_points, n_sets=args.eval_sets)
        clock.append((time.perf_counter(), time.process_time()))
        save_plot(out / "loss.png", trainer, table, args.iters)
        names = ("setup", "train", "evaluate")
        metrics = {"settings": settings(args), "device": str(device), "resumed_from_step": start, "table": table,
                   "steps": len(trainer.history), "final_loss": trainer.history[-1] if trainer.history else None,
                   "init": "k-means++ (imgmw.init.init_gmm), the same initial GMM for all rows",
                   "timings_s": {name: b[0] - a[0] for name, a, b in zip(names, clock, clock[1:])},
                   "cpu_s": {name: b[1] - a[1] for name, a, b in zip(names, clock, clock[1:])}}
        write_json(metrics, out / "metrics.json")
    if not args.quiet:
        print_table(table, args.iters)
        print(f"wrote {ckpt}, {args.output / 'loss.png'}, {args.output / 'metrics.json'}")
    return 0


def _main(argv: Sequence[str] | None) -> int:
    """Train (or resume), evaluate, and write checkpoint, plot and metrics (torch uses ``--threads``)."""
    args = build_parser().parse_args(argv)
    _check_args(args)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, resolve_device(args.device))
    finally:
        torch.set_num_threads(threads)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2: one line on stderr for a bad command line, input or
    divergence; 130: interrupted)."""
    try:
        return run(PROG, _main, argv)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)


if __name__ == "__main__":
    sys.exit(main())
