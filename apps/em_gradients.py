"""Studies of the gradient modes of differentiable EM: autodiff (AD), implicit, one-step (OS), warm start.

Four sub-commands reproduce and extend the paper's experiments on differentiating through EM
(Boïté et al. 2025); each writes PNG plots and a ``results.json`` under ``--output`` (default
``outputs/em_gradients/<command>/``). The studies live in :mod:`imgmw.studies`; this is their front end.

- ``accuracy``: d=3, K=3 random mixtures from well to badly conditioned; sweeps n (T=30) and T (n=200).
  Per draw: fixed-point error ``‖θ_T − F(θ_T, X)‖²/p``, ``‖∂_θF‖₂`` (power iteration, in the implicit
  solver's coordinates), and the relative error against AD of the gradient of a loss with respect to X
  for OS, the matrix-free implicit gradient (IMP) and the paper's dense approximate implicit (AI).
- ``flow``: the 2-D particle flow ``min_X MW2²(EM fit of X, ν)`` (n=200, K=3, fixed uniform weights) with
  each gradient mode; final energy, wall time and bytes saved for backward; trajectories.
- ``stability``: MW2² between an EM fit on n samples and the true mixture (K=3, d=2, three separation
  levels, repeats batched into one fit) against n, with an ``n^-1/2`` reference. (With estimated
  weights MW2² is linear in the weight errors, which are ``O(n^-1/2)``.)
- ``scaling``: time and saved-for-backward memory of one backward pass for AD, IMP, OS (and dense AI
  while it fits in memory) as T grows (d=3) and as d grows (AD with T=10 steps; IMP, OS and AI with
  T=100, enough for EM to converge, which the implicit gradient assumes and which costs them no memory).

The loss is ``MW2²(fit, ν)`` (:func:`imgmw.mw2`) to a fixed target mixture ``ν``; ``results.json`` names it.
With no sub-command, ``accuracy`` runs.

Example::

    python -m apps.em_gradients accuracy --quick
    python -m apps.em_gradients scaling --output /tmp/scaling
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from apps._cli import AppParser, check_output, positive_int, resolve_device, run, seed, staged_output, write_json

PROG = "em_gradients"
COMMANDS = ("accuracy", "flow", "stability", "scaling")
HELPS = {"accuracy": "gradient accuracy of OS / implicit / dense AI against AD (n and T sweeps)",
         "flow": "2-D particle flow minimising MW2² with each gradient mode",
         "stability": "MW2² between EM fits and the true mixture against n",
         "scaling": "time and memory of one backward pass against T and d"}
# --quick sizes (seconds), as keyword arguments of the imgmw.studies functions; the defaults are the full studies.
QUICK: dict[str, dict[str, Any]] = {
    "accuracy": {"n_points": (100, 200), "n_iter": (1, 10), "fixed_n_iter": 10, "fixed_n_points": 100,
                 "conditions": ("well", "bad"), "draws": 2},
    "flow": {"n_iter": 12},
    "stability": {"n_points": (200, 800), "repeats": 4, "n_iter": 30},
    "scaling": {"n_iter": (1, 5, 20), "n_features": (3, 16), "n_points_t": 200, "n_points_d": 300,
                "unrolled_n_iter": 5, "converged_n_iter": 30}}


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    common = AppParser(add_help=False)
    common.add_argument("--output", type=Path, default=None,
                        help="output directory (default outputs/em_gradients/<command>/)")
    common.add_argument("--quick", action="store_true", help="tiny sizes (seconds): for tests and smoke runs")
    common.add_argument("--seed", type=seed, default=0, help="seed of every random draw")
    common.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    common.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    common.add_argument("--threads", type=positive_int, default=1, help="CPU threads for torch")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    p = AppParser(prog=f"python -m apps.{PROG}", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    parsers = {name: sub.add_parser(name, parents=[common], help=HELPS[name], description=HELPS[name])
               for name in COMMANDS}
    parsers["flow"].add_argument("--iters", type=positive_int, default=None,
                                 help="optimiser steps (default 150, 12 with --quick)")
    parsers["accuracy"].add_argument("--draws", type=positive_int, default=None,
                                     help="random draws per setting (default 60, 2 with --quick)")
    return p


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["accuracy", *argv]
    return parser.parse_args(argv)


class _Bars:
    """The studies' ``progress(description, done, total)`` hook drawn as tqdm bars, one per description."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bars: dict[str, Any] = {}

    def __call__(self, desc: str, done: int, total: int) -> None:
        if self.quiet:
            return
        if desc not in self.bars:
            from tqdm import tqdm

            self.bars[desc] = tqdm(desc=desc, total=total, leave=False)
        bar = self.bars[desc]
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            del self.bars[desc]


# --------------------------------------------------------------------------- the studies
def _study(args: argparse.Namespace) -> tuple[dict, dict]:
    """Run ``args.command`` with the flags' sizes: ``(results, {file stem: figure})``."""
    import torch

    from apps import _gradient_figures as figures
    from imgmw import studies

    torch.set_num_threads(args.threads)
    sizes = dict(QUICK[args.command]) if args.quick else {}
    common = {"seed": args.seed, "device": resolve_device(args.device), "dtype": getattr(torch, args.dtype),
              "progress": _Bars(args.quiet)}
    if args.command == "accuracy":
        if args.draws is not None:
            sizes["draws"] = args.draws
        results = studies.accuracy_study(**sizes, **common)
        plots = figures.accuracy_figures(results)
    elif args.command == "flow":
        if args.iters is not None:
            sizes["n_iter"] = args.iters
        flow = studies.flow_study(**sizes, **common)
        results, plots = flow.results, figures.flow_figures(flow.results, flow.trajectories, flow.target)
    elif args.command == "stability":
        results = studies.stability_study(**sizes, **common)
        plots = figures.stability_figures(results)
    else:
        results = studies.scaling_study(**sizes, **common)
        plots = figures.scaling_figures(results)
    results["quick"] = args.quick
    results["seed"], results["device"], results["dtype"] = args.seed, args.device, args.dtype
    return results, plots


def _write(out: Path, results: dict, figures: dict) -> list[str]:
    """Write ``results.json`` (strict JSON: non-finite numbers become ``null``) and the matplotlib figures
    into ``out`` as a whole (:func:`apps._cli.staged_output`); returns the written file names."""
    names = []
    with staged_output(out) as stage:
        for name, fig in figures.items():
            fig.savefig(stage / f"{name}.png", dpi=110, bbox_inches="tight")
            names.append(f"{name}.png")
        write_json(results, stage / "results.json")
        names.append("results.json")
    return names


# --------------------------------------------------------------------------- entry point
def _main(argv: Sequence[str] | None) -> int:
    args = _parse(argv)
    out = args.output if args.output is not None else Path("outputs") / PROG / args.command
    check_output(out)  # before the study: an unusable --output is reported at once
    results, figures = _study(args)
    names = _write(out, results, figures)
    print(f"{PROG} {args.command}: wrote {', '.join(names)} in {out}/")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2: one line on stderr for a bad command line, an
    unusable --output or a diverging flow; 130: interrupted)."""
    try:
        return run(PROG, _main, argv)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)


if __name__ == "__main__":
    sys.exit(main())
