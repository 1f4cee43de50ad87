"""Train EM as a neural operator (:class:`imgmw.layers.EMLayer`) on synthetic Gaussian-mixture data sets.

Each training step draws a fresh batch of random ``K``-component mixtures in ``D`` dimensions, samples
``N`` points from each, initialises every set by seeded k-means++ (:func:`imgmw.init.init_gmm`) and
minimises the per-point negative log-likelihood of the mixture that the layer (``T`` unrolled EM steps
with learned residual corrections) fits to it. Evaluation uses held-out sets drawn from a fixed seed and
compares, from the **same k-means++ initial mixture per set**:

    plain EM with T steps  |  the trained layer with T steps  |  plain EM with 10·T steps

by the mean log-likelihood per point of each set under the fitted mixture, and reports which fraction of
the gap between the two plain-EM rows the layer closes.

Outputs (under ``--output``, default ``outputs/em_operator/``): ``checkpoint.pt`` (written atomically;
``--resume`` continues training from it up to ``--train-steps``), ``loss.png`` (training loss and the
layer's gain over plain EM, with the held-out levels) and ``metrics.json`` (settings, timings, the table).

Example::

    python -m apps.em_operator --k 4 --dim 2 --iters 3 --train-steps 600
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

from apps._cli import (AppError, AppParser, Interrupted, check_output, positive_float, positive_int, resolve_device,
                       run, seed, staged_output, write_json)

PROG = "em_operator"
CHECKPOINT = "checkpoint.pt"
EVAL_SEED = 20250902  # held-out sets and their k-means++ initialisations: fixed, independent of --seed
EVAL_SETS = 256
# Shape of the random mixtures: means ~ N(0, SEPARATION² I); each covariance has a random orientation
# and eigenvalues log-uniform in [COV_MIN, 1]; weights softmax(N(0, WEIGHT_SPREAD²)).
SEPARATION = 2.0
COV_MIN = 0.05
WEIGHT_SPREAD = 0.5
# Settings that must match between a checkpoint and the flags for --resume.
ARCH_KEYS = ("k", "dim", "iters", "hidden", "n_points", "batch", "lr", "seed", "residual_every_step")


def build_parser() -> argparse.ArgumentParser:
    p = AppParser(prog=f"python -m apps.{PROG}", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--k", type=positive_int, default=4, help="components K of the mixtures and of the layer")
    p.add_argument("--dim", type=positive_int, default=2, help="dimension D of the points")
    p.add_argument("--n-points", type=positive_int, default=256, help="points N per data set")
    p.add_argument("--iters", type=positive_int, default=3, help="unrolled EM steps T of the layer")
    p.add_argument("--train-steps", type=int, default=1000, help="total optimiser steps")
    p.add_argument("--batch", type=positive_int, default=32, help="data sets per training step")
    p.add_argument("--lr", type=positive_float, default=1e-2, help="Adam learning rate (cosine-decayed to 0)")
    p.add_argument("--hidden", type=positive_int, default=64, help="hidden width of the correction MLPs")
    p.add_argument("--final-only", dest="residual_every_step", action="store_false",
                   help="correct only after the last EM step instead of after every step")
    p.add_argument("--eval-sets", type=positive_int, default=EVAL_SETS, help="held-out data sets")
    p.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps (0: at the end only)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the weights and of the training stream")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="CPU threads for torch (the per-step tensors are small: more threads mostly add overhead)")
    p.add_argument("--output", type=Path, default=Path("outputs") / PROG)
    p.add_argument("--resume", action="store_true", help=f"continue from OUTPUT/{CHECKPOINT}")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.train_steps < 0 or args.save_every < 0:
        raise AppError("--train-steps and --save-every must be >= 0")
    if args.n_points < args.k:
        raise AppError(f"--n-points ({args.n_points}) must be >= --k ({args.k})")
    check_output(args.output)
    if args.resume and not (args.output / CHECKPOINT).is_file():
        raise AppError(f"--resume: no checkpoint at {args.output / CHECKPOINT}")


# --------------------------------------------------------------------------- data
def random_mixtures(n_sets: int, k: int, d: int, generator, device):
    """``n_sets`` random ``K``-component mixtures in ``D`` dims (module constants give their shape)."""
    import torch

    from imgmw.gmm import GMM

    def draw(*shape):
        return torch.randn(*shape, generator=generator, device=device)

    logits = WEIGHT_SPREAD * draw(n_sets, k)
    means = SEPARATION * draw(n_sets, k, d)
    q, r = torch.linalg.qr(draw(n_sets, k, d, d))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # Haar-distributed rotations
    u = torch.rand(n_sets, k, d, generator=generator, device=device)
    eig = COV_MIN ** u
    cov = (q * eig.unsqueeze(-2)) @ q.mT
    return GMM(torch.softmax(logits, -1), means, 0.5 * (cov + cov.mT))


def make_batch(n_sets: int, args: argparse.Namespace, seed: int, device):
    """Points ``[n_sets, N, D]`` from fresh random mixtures and their seeded k-means++ initial GMMs."""
    import torch

    from imgmw.init import init_gmm

    gen = torch.Generator(device=device).manual_seed(seed)
    x, _ = random_mixtures(n_sets, args.k, args.dim, gen, device).sample(args.n_points, generator=gen)
    return x, init_gmm(x, args.k, "kmeans++", generator=gen)


def _train_seed(seed: int, step: int) -> int:
    """Seed of training batch ``step``: a pure function of (seed, step), so --resume replays the stream."""
    return (seed * 1_000_003 + step + 1) % (1 << 62)


# --------------------------------------------------------------------------- model and checkpoint
def build(args: argparse.Namespace, device):
    """The layer (its k-means++ start given per set, the same for every row of the table), Adam and a cosine
    schedule to 0."""
    import torch

    from imgmw.layers import EMLayer

    torch.manual_seed(args.seed)
    layer = EMLayer(args.k, args.dim, args.iters, init="given", hidden=args.hidden,
                    residual_every_step=args.residual_every_step).to(device)
    opt = torch.optim.Adam(layer.parameters(), lr=args.lr)
    total = max(args.train_steps, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    return layer, opt, sched


def save_checkpoint(path: Path, layer, opt, sched, step: int, history: dict[str, list[float]],
                    args: argparse.Namespace) -> None:
    """Write the training state to ``path`` atomically (:func:`imgmw.checkpoint.save_atomic`)."""
    from imgmw.checkpoint import save_atomic

    state = {"model": layer.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "step": step, "history": history, "settings": _settings(args)}
    save_atomic(state, path)


def load_checkpoint(path: Path, layer, opt, sched, args: argparse.Namespace) -> tuple[int, dict[str, list[float]]]:
    """Restore the state saved by :func:`save_checkpoint`; returns ``(step, history)``.

    Raises :class:`apps._cli.AppError` when the file is not such a checkpoint or was trained with other settings in ``ARCH_KEYS``
    (``--train-steps`` may differ: the cosine schedule then continues with the new total).
    """
    import torch

    try:
        state = torch.load(path, map_location=next(layer.parameters()).device, weights_only=True)
    except Exception as err:  # noqa: BLE001 - text, truncated or foreign files: one clear line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AppError(f"--resume: {path} is not a readable checkpoint ({first})") from None
    keys = ("model", "optimizer", "scheduler", "step", "history", "settings")
    if not isinstance(state, dict) or not all(key in state for key in keys):
        raise AppError(f"--resume: {path} is not an em_operator checkpoint (expected the keys {', '.join(keys)})")
    saved, now = state["settings"], _settings(args)
    diff = [f"--{key.replace('_', '-')}" for key in ARCH_KEYS if saved.get(key) != now[key]]
    if diff:
        raise AppError(f"--resume: checkpoint {path} was trained with different {', '.join(diff)}")
    try:
        layer.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0]
        raise AppError(f"--resume: {path} does not fit this model ({first})") from None
    return int(state["step"]), {key: list(values) for key, values in state["history"].items()}


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}


# --------------------------------------------------------------------------- training and evaluation
def _plain_em_nll(x, init, iters: int) -> float:
    """Per-point negative log-likelihood of plain EM with ``iters`` steps from ``init`` (no gradients)."""
    import torch

    from imgmw.em import fit_gmm

    with torch.no_grad():
        return -float(fit_gmm(x, init.n_components, n_iter=iters, init=init, grad="none").gmm.log_prob(x).mean())


def train(layer, opt, sched, args: argparse.Namespace, device, start: int, history: dict[str, list[float]],
          ckpt: Path, saved: list[int]) -> dict[str, list[float]]:
    """Optimiser steps ``start .. train_steps − 1``; the steps of the periodic checkpoints written to ``ckpt``
    are appended to ``saved``.

    ``history["loss"]`` is the per-point training loss of each step, ``history["em_loss"]`` the same
    quantity for plain EM (T steps) on the same batch: their difference is the gain of the layer,
    which is far less noisy than the loss itself (sets differ in how well any mixture can fit them).
    """
    import torch
    from tqdm import tqdm

    from imgmw.flow import check_divergence
    from imgmw.layers import nll_loss

    bar = tqdm(range(start, args.train_steps), initial=start, total=args.train_steps, disable=args.quiet,
               desc="train", dynamic_ncols=True)
    for step in bar:
        x, init = make_batch(args.batch, args, _train_seed(args.seed, step), device)
        loss = nll_loss(layer(x, init=init)[2], n_points=args.n_points)
        check_divergence(history["loss"] + [float(loss.detach())], list(layer.parameters()), args.lr,
                         what="training")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(layer.parameters(), 1.0)
        opt.step()
        sched.step()
        history["loss"].append(float(loss.detach()))
        history["em_loss"].append(_plain_em_nll(x, init, args.iters))
        recent = slice(-50, None)
        gain = (sum(history["em_loss"][recent]) - sum(history["loss"][recent])) / len(history["loss"][recent])
        bar.set_postfix(loss=f"{history['loss'][-1]:.4f}", gain_vs_em=f"{gain:+.4f}")
        if args.save_every and (step + 1) % args.save_every == 0:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint(ckpt, layer, opt, sched, step + 1, history, args)
            saved.append(step + 1)
    return history


def evaluate(layer, args: argparse.Namespace, device) -> dict[str, float]:
    """Held-out mean log-likelihood per point: plain EM (T and 10·T steps) and the layer, same inits."""
    import torch

    x, init = make_batch(args.eval_sets, args, EVAL_SEED, device)
    with torch.no_grad():
        trained = float((layer(x, init=init)[2] / args.n_points).mean())
    em_t, em_10t = -_plain_em_nll(x, init, args.iters), -_plain_em_nll(x, init, 10 * args.iters)
    gap = em_10t - em_t
    return {"em_T": em_t, "layer_T": trained, "em_10T": em_10t,
            "gap_closed": (trained - em_t) / gap if gap > 0 else float("nan")}


def print_table(table: dict[str, float], iters: int) -> None:
    rows = [(f"plain EM, T={iters}", table["em_T"]), (f"EM layer (trained), T={iters}", table["layer_T"]),
            (f"plain EM, T={10 * iters}", table["em_10T"])]
    print(f"{'held-out, k-means++ init':<30} {'mean log-lik / point':>21}")
    for name, value in rows:
        print(f"{name:<30} {value:>21.4f}")
    print(f"{'gap closed by training':<30} {100 * table['gap_closed']:>20.1f}%")


def _moving_mean(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def save_plot(path: Path, history: dict[str, list[float]], table: dict[str, float], iters: int) -> None:
    """Training loss (top) and the layer's gain over plain EM on the same batches (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss, em_loss = history["loss"], history["em_loss"]
    steps = range(1, len(loss) + 1)
    window = max(1, len(loss) // 30)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 6.0), sharex=True)
    top.plot(steps, loss, lw=0.5, color="0.65", label="loss (NLL per point)")
    top.plot(steps, _moving_mean(loss, window), color="C0", label=f"moving mean ({window} steps)")
    top.set_ylabel("training loss")
    top.legend(fontsize=8)
    gain = [e - v for e, v in zip(em_loss, loss)]
    bottom.plot(steps, _moving_mean(gain, window), color="C0", label=f"training batches (moving mean, {window})")
    bottom.axhline(table["layer_T"] - table["em_T"], color="C0", ls="--", label=f"held-out: trained layer, T={iters}")
    bottom.axhline(table["em_10T"] - table["em_T"], color="C2", ls="--", label=f"held-out: plain EM, T={10 * iters}")
    bottom.axhline(0.0, color="C3", ls=":", label=f"plain EM, T={iters}")
    bottom.set_xlabel("optimiser step")
    bottom.set_ylabel(f"log-lik / point over EM T={iters}")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _execute(args: argparse.Namespace) -> int:
    """Train (or resume), evaluate, and write checkpoint, plot and metrics (torch uses ``--threads``)."""
    import torch

    device = resolve_device(args.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, device)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, device) -> int:
    clock = [(time.perf_counter(), time.process_time())]
    layer, opt, sched = build(args, device)
    ckpt = args.output / CHECKPOINT
    start, history = (load_checkpoint(ckpt, layer, opt, sched, args) if args.resume
                      else (0, {"loss": [], "em_loss": []}))
    clock.append((time.perf_counter(), time.process_time()))
    with staged_output(args.output) as out:
        saved: list[int] = []
        try:
            history = train(layer, opt, sched, args, device, start, history, ckpt, saved)
        except KeyboardInterrupt:
            if not saved:
                raise
            raise Interrupted(f"{ckpt} holds step {saved[-1]}; continue with --resume") from None
        save_checkpoint(out / CHECKPOINT, layer, opt, sched, max(start, args.train_steps), history, args)
        clock.append((time.perf_counter(), time.process_time()))
        table = evaluate(layer, args, device)
        clock.append((time.perf_counter(), time.process_time()))
        save_plot(out / "loss.png", history, table, args.iters)
        names = ("setup", "train", "evaluate")
        metrics = {"settings": _settings(args), "device": str(device), "resumed_from_step": start,
                   "steps": len(history["loss"]),
                   "final_train_loss": history["loss"][-1] if history["loss"] else None,
                   "final_loss": history["loss"][-1] if history["loss"] else None,
                   "table": table, "init": "k-means++ (imgmw.init.init_gmm), the same initial GMM for all rows",
                   "timings_s": {name: b[0] - a[0] for name, a, b in zip(names, clock, clock[1:])},
                   "cpu_s": {name: b[1] - a[1] for name, a, b in zip(names, clock, clock[1:])}}
        write_json(metrics, out / "metrics.json")
    if not args.quiet:
        print_table(table, args.iters)
        print(f"wrote {ckpt}, {args.output / 'loss.png'}, {args.output / 'metrics.json'}")
    return 0


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    _check_args(args)
    return _execute(args)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2: one line on stderr for a bad command line, input or
    divergence; 130: interrupted)."""
    try:
        return run(PROG, _main, argv)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)


if __name__ == "__main__":
    sys.exit(main())
