"""Studies of the gradient modes of differentiable EM: autodiff (AD), implicit, one-step (OS), warm start.

Four sub-commands reproduce and extend the paper's experiments on differentiating through EM
(Boïté et al. 2025); each writes PNG plots and a ``results.json`` under ``--output`` (default
``outputs/em_gradients/<command>/``):

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

The loss is ``MW2²(fit, ν)`` (:func:`imgmw.ot.mw2`) to a fixed target mixture ``ν``; if ``imgmw.ot`` cannot
be imported the parameter loss ``Σ_k ‖m_k − m'_k‖² + ‖Σ_k − Σ'_k‖²_F`` is used instead (``flow`` and
``stability`` need MW2). ``results.json`` names the loss used. With no sub-command, ``accuracy`` runs.

Example::

    python -m apps.em_gradients accuracy --quick
    python -m apps.em_gradients scaling --output /tmp/scaling
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from apps._cli import AppError, AppParser, check_output, positive_int, run, seed, staged_output, write_json

PROG = "em_gradients"
COMMANDS = ("accuracy", "flow", "stability", "scaling")
MODES = ("unrolled", "one_step", "implicit")
LABELS = {"unrolled": "AD", "one_step": "OS", "implicit": "IMP", "dense_ai": "AI", "warm_start": "warm start"}
# Random mixtures of the accuracy study: pairwise mean distance SEP·√2, covariance condition number COND.
CONDITIONS = {"well": (4.0, 2.0), "medium": (2.0, 10.0), "bad": (1.0, 50.0)}
SEPARATIONS = {"separated": 4.0, "moderate": 2.0, "overlapping": 1.0}  # stability study, unit covariances
DENSE_LIMIT_BYTES = 256 * 2**20  # dense AI is attempted while its Jacobians fit in this budget


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
    helps = {"accuracy": "gradient accuracy of OS / implicit / dense AI against AD (n and T sweeps)",
             "flow": "2-D particle flow minimising MW2² with each gradient mode",
             "stability": "MW2² between EM fits and the true mixture against n",
             "scaling": "time and memory of one backward pass against T and d"}
    parsers = {name: sub.add_parser(name, parents=[common], help=helps[name], description=helps[name])
               for name in COMMANDS}
    parsers["flow"].add_argument("--iters", type=positive_int, default=None,
                                 help="optimiser steps (default 150, 8 with --quick)")
    parsers["accuracy"].add_argument("--draws", type=positive_int, default=None,
                                     help="random draws per setting (default 60, 3 with --quick)")
    return p


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["accuracy", *argv]
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- shared helpers
def _setup(args: argparse.Namespace):
    """Torch settings from the flags: ``(device, dtype)``."""
    import torch

    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise AppError("--device cuda requested but CUDA is not available")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    return device, getattr(torch, args.dtype)


def _generator(seed: int, device):
    import torch

    return torch.Generator(device=device).manual_seed(seed)


def _progress(items, quiet: bool, desc: str, total: int | None = None):
    from tqdm import tqdm

    return tqdm(items, desc=desc, disable=quiet, leave=False, total=total)


class SavedTensorMeter:
    """Bytes of the distinct storages autograd saves for backward while the context is active.

    Counts every tensor packed through ``torch.autograd.graph.saved_tensors_hooks`` (forward graphs, and
    graphs built inside a backward pass that runs in the context) once per storage; packed storages are
    kept alive until the meter is dropped so that a freed address is never reused and merged.
    """

    def __init__(self) -> None:
        import torch

        self.storages: dict[int, Any] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        st = t.untyped_storage()
        self.storages[st.data_ptr()] = st
        return t

    @property
    def bytes(self) -> int:
        return sum(st.nbytes() for st in self.storages.values())

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def random_rotation(batch: int, d: int, generator, dtype, device):
    """``[batch, d, d]`` orthogonal matrices (QR of Gaussian matrices, sign-fixed)."""
    import torch

    q, r = torch.linalg.qr(torch.randn(batch, d, d, generator=generator, dtype=dtype, device=device))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def random_gmm(batch: int, k: int, d: int, sep: float, cond: float, generator, dtype, device):
    """``batch`` random mixtures: means ``sep·(orthonormal directions)`` (pairwise distance ``sep·√2`` when
    ``k ≤ d``, else random normal ``sep``-scaled), covariances ``R diag(λ) Rᵀ`` with ``λ`` log-spaced over
    ``[cond^-½, cond^½]``, weights ``softmax(0.3·z)``."""
    import torch

    from imgmw import GMM

    if k <= d:
        means = sep * random_rotation(batch, d, generator, dtype, device)[..., :k].mT
    else:
        means = sep * torch.randn(batch, k, d, generator=generator, dtype=dtype, device=device)
    lam = torch.logspace(-0.5, 0.5, d, base=cond, dtype=dtype, device=device)
    rot = random_rotation(batch * k, d, generator, dtype, device).reshape(batch, k, d, d)
    cov = (rot * lam) @ rot.mT
    cov = 0.5 * (cov + cov.mT)
    weights = torch.softmax(0.3 * torch.randn(batch, k, generator=generator, dtype=dtype, device=device), -1)
    return GMM(weights, means, cov)


def shifted_target(gmm, shift: float = 0.5, scale: float = 1.3):
    """The fixed target ``ν`` of the gradient studies: means moved by ``shift`` along the first axis,
    covariances scaled by ``scale``, weights kept."""
    from imgmw import GMM

    means = gmm.means.clone()
    means[..., 0] += shift
    return GMM(gmm.weights, means, scale * gmm.covariances)


LOSS_MW2 = "MW2^2(fit, target)"
LOSS_PARAM = "sum_k |m_k - t_k|^2 + |S_k - T_k|_F^2 (imgmw.ot unavailable)"


def _mw2_available() -> bool:
    try:
        from imgmw.ot import mw2  # noqa: F401
    except ImportError:
        return False
    return True


def make_loss(target) -> tuple[Callable, str]:
    """``(loss(gmm) -> [*B], name)``: ``MW2²(gmm, target)`` if :mod:`imgmw.ot` imports, else the parameter loss."""
    if _mw2_available():
        from imgmw.ot import mw2

        return (lambda gmm: mw2(gmm, target)), LOSS_MW2

    def param_loss(gmm):
        dm = (gmm.means - target.means).square().sum((-1, -2))
        dc = (gmm.covariances - target.covariances).square().sum((-1, -2, -3))
        return dm + dc

    return param_loss, LOSS_PARAM


def _need_mw2(command: str):
    try:
        from imgmw.ot import mw2
    except ImportError as err:
        raise AppError(f"'{command}' needs imgmw.ot.mw2, which cannot be imported ({err})") from err
    return mw2


def quartiles(values) -> dict[str, float]:
    """Median and quartiles of a 1-D tensor of finite values (NaNs are counted and dropped)."""
    import torch

    v = values.detach().double().flatten().cpu()
    finite = v[torch.isfinite(v)]
    if finite.numel() == 0:
        return {"median": math.nan, "q25": math.nan, "q75": math.nan, "count": 0, "non_finite": int(v.numel())}
    q = torch.quantile(finite, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return {"median": float(q[1]), "q25": float(q[0]), "q75": float(q[2]), "count": int(finite.numel()),
            "non_finite": int(v.numel() - finite.numel())}


def relative_error(g, ref):
    """Per-batch-element ``‖g − ref‖ / ‖ref‖`` over the trailing ``[N, D]`` dims."""
    return (g - ref).flatten(-2).norm(dim=-1) / ref.flatten(-2).norm(dim=-1)


def _theta_vector(gmm):
    """``(w, m, vech Σ)`` flattened per batch element: ``[*B, p]``."""
    import torch

    d = gmm.n_features
    rows, cols = torch.tril_indices(d, d, device=gmm.device)
    return torch.cat([gmm.weights, gmm.means.flatten(-2), gmm.covariances[..., rows, cols].flatten(-2)], -1)


def fixed_point_error(gmm, x, fixed_weights: bool = False):
    """``‖θ − F(θ, X)‖² / p`` per batch element, θ = (w, m, vech Σ)."""
    import torch

    from imgmw import em_step

    with torch.no_grad():
        diff = _theta_vector(gmm) - _theta_vector(em_step(gmm, x, fixed_weights=fixed_weights))
    return diff.square().sum(-1) / diff.shape[-1]


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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


PLOT_ZERO = 1e-30  # exact zeros (e.g. OS = AD at T=1) are drawn here on log axes


def _band(ax, xs, stats: list[dict], label: str, **kw) -> None:
    """Median line with a quartile band (exact zeros drawn at ``PLOT_ZERO``)."""
    def col(key: str) -> list[float]:
        return [s[key] if s[key] > 0 else PLOT_ZERO for s in stats]

    line, = ax.plot(xs, col("median"), marker="o", ms=3, label=label, **kw)
    ax.fill_between(xs, col("q25"), col("q75"), color=line.get_color(), alpha=0.2)


# --------------------------------------------------------------------------- accuracy
def _accuracy_draws(x, init, target_loss, n_iter: int) -> dict[str, Any]:
    """Per-draw metrics of one (n, T, condition) setting for points ``x [B, n, d]`` and ``init``."""
    import torch

    from imgmw import GMM, fit_gmm
    from imgmw.implicit import dense_implicit_gradient, step_jacobian_norm, step_spectral_radius

    grads, solves = {}, []
    theta = None
    for mode in MODES:
        xx = x.clone().requires_grad_(True)
        opts = {"callback": solves.append} if mode == "implicit" else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # unconverged solves are counted below
            res = fit_gmm(xx, init.n_components, n_iter=n_iter, init=init, grad=mode, implicit_options=opts)
            (grads[mode],) = torch.autograd.grad(target_loss(res.gmm).sum(), xx)
        if mode == "unrolled":
            theta = res.gmm.detach()
    out = {"fixed_point_error": fixed_point_error(theta, x),
           "jacobian_norm": step_jacobian_norm(theta, x, n_iter=50, rtol=1e-4, generator=_generator(0, x.device)),
           "spectral_radius": step_spectral_radius(theta, x, n_iter=40, generator=_generator(1, x.device)),
           "rel_err_one_step": relative_error(grads["one_step"], grads["unrolled"]),
           "rel_err_implicit": relative_error(grads["implicit"], grads["unrolled"]),
           "implicit_unconverged": int((~solves[-1].converged).sum()) if solves else 0}
    leaves = [t.clone().requires_grad_(True) for t in (theta.weights, theta.means, theta.covariances)]
    g_theta = torch.autograd.grad(target_loss(GMM(*leaves)).sum(), leaves)
    ai = dense_implicit_gradient(theta, x, g_theta)
    out["rel_err_dense_ai"] = relative_error(ai, grads["unrolled"])
    out["dense_ai_vs_implicit"] = relative_error(ai, grads["implicit"])
    return out


def _accuracy_setting(n: int, n_iter: int, cond: tuple[float, float], draws: int, seed: int, device,
                      dtype) -> dict[str, Any]:
    """Metrics of one setting, draws batched in chunks that keep AD's graph small."""
    import torch

    from imgmw.init import init_gmm

    gen = _generator(seed, device)
    truth = random_gmm(draws, 3, 3, cond[0], cond[1], gen, dtype, device)
    x, _ = truth.sample(n, generator=gen)
    init = init_gmm(x, 3, "kmeans++", generator=gen)
    per_chunk = max(1, 300_000 // (n * max(n_iter, 1)))
    parts = []
    for lo in range(0, draws, per_chunk):
        sl = slice(lo, min(lo + per_chunk, draws))
        sub_loss, _ = make_loss(shifted_target(truth[sl]))
        parts.append(_accuracy_draws(x[sl], init[sl], sub_loss, n_iter))
    merged: dict[str, Any] = {}
    for key in parts[0]:
        if key == "implicit_unconverged":
            merged[key] = sum(p[key] for p in parts)
        else:
            merged[key] = quartiles(torch.cat([p[key] for p in parts]))
    return merged


def run_accuracy(args: argparse.Namespace) -> tuple[dict, dict]:
    device, dtype = _setup(args)
    quick = args.quick
    draws = args.draws if args.draws is not None else (2 if quick else 60)
    n_values = [100, 200] if quick else [100, 200, 500, 1000, 1500, 2000]
    t_values = [1, 10] if quick else [1, 2, 5, 10, 15, 20, 30, 40]
    n_fixed_t, t_fixed_n = (10, 100) if quick else (30, 200)
    conditions = {k: CONDITIONS[k] for k in (("well", "bad") if quick else CONDITIONS)}
    settings = ([("n", n, n_fixed_t) for n in n_values] + [("T", t_fixed_n, t) for t in t_values])
    results: dict[str, Any] = {"command": "accuracy", "d": 3, "K": 3, "draws": draws, "quick": quick,
                               "fixed_weights": False, "init": "kmeans++ (shared by all modes)",
                               "implicit_solver": "gmres, tol = sqrt(eps)",
                               "loss": LOSS_MW2 if _mw2_available() else LOSS_PARAM,
                               "conditions": {k: {"separation": v[0], "cov_condition": v[1]}
                                              for k, v in conditions.items()},
                               "sweep_n": {}, "sweep_T": {}}
    start = time.perf_counter()
    jobs = [(name, cond, kind, n, t) for name, cond in conditions.items() for kind, n, t in settings]
    for i, (name, cond, kind, n, t) in enumerate(_progress(jobs, args.quiet, "accuracy")):
        metrics = _accuracy_setting(n, t, cond, draws, args.seed * 1000 + i, device, dtype)
        key = "sweep_n" if kind == "n" else "sweep_T"
        results[key].setdefault(name, []).append({"n": n, "T": t, **metrics})
    results["seconds"] = time.perf_counter() - start
    results["n_values"], results["T_values"] = n_values, t_values
    return results, _accuracy_figures(results)


def _accuracy_figures(results: dict) -> dict:
    plt = _pyplot()
    figures = {}
    for sweep, axis in (("sweep_n", "n"), ("sweep_T", "T")):
        conds = list(results[sweep])
        fig, axes = plt.subplots(len(conds), 3, figsize=(13, 3.2 * len(conds)), squeeze=False)
        for row, name in enumerate(conds):
            rows = results[sweep][name]
            xs = [r[axis] for r in rows]
            ax_fp, ax_j, ax_err = axes[row]
            _band(ax_fp, xs, [r["fixed_point_error"] for r in rows], "‖θ_T − F(θ_T)‖²/p")
            _band(ax_j, xs, [r["jacobian_norm"] for r in rows], "‖∂_φF̃‖₂")
            _band(ax_j, xs, [r["spectral_radius"] for r in rows], "ρ(∂_φF̃)")
            for key, label in (("rel_err_one_step", "OS"), ("rel_err_implicit", "IMP"),
                               ("rel_err_dense_ai", "AI (dense)")):
                _band(ax_err, xs, [r[key] for r in rows], label, ls="--" if key == "rel_err_dense_ai" else "-")
            ax_fp.set_yscale("log")
            ax_err.set_yscale("log")
            ax_fp.set_ylabel(name)
            for ax, title in ((ax_fp, "fixed-point error"), (ax_j, "norm and spectral radius of ∂F"),
                              (ax_err, "relative error vs AD")):
                ax.set_title(title, fontsize=9)
                ax.set_xlabel(axis)
                ax.legend(fontsize=7)
        fig.suptitle(f"gradient accuracy, d=3, K=3 ({results['loss']}); median and quartiles", fontsize=10)
        fig.tight_layout()
        figures[f"accuracy_vs_{axis}"] = fig
    return figures


# --------------------------------------------------------------------------- flow
def _flow_gmm(mode: str, x, n_iter: int, prev: list, warm):
    """The EM fit a flow step differentiates: the warm start, or ``T`` steps (gradient ``mode``) from the
    previous step's detached fit ``prev[0]``, which the call replaces. Every mode thus follows one EM
    optimum as the points move; fresh k-means++ starts at every step jumped between optima, and the flow
    diverged (seeds 0 and 1, unrolled and implicit)."""
    from imgmw import fit_gmm

    if mode == "warm_start":
        return warm(x)
    gmm = fit_gmm(x, 3, n_iter=n_iter, init=prev[0], fixed_weights=True, grad=mode).gmm
    prev[0] = gmm.detach()
    return gmm


def _flow_run(mode: str, x0, target, iters: int, lr: float, n_iter: int, seed: int, quiet: bool) -> dict:
    """Gradient descent ``x ← x − lr·n·∇E(x)`` with ``E = MW2²(fit(x), ν)`` (:func:`imgmw.flow.run_flow`; the
    warm start is the paper's plain Algorithm 3, no fit-keeping policy); returns the record of the run."""
    import torch

    from imgmw import fit_gmm
    from imgmw.flow import run_flow as drive
    from imgmw.ot import mw2
    from imgmw.warm import WarmStartEM

    start = fit_gmm(x0, 3, n_iter=10, init="kmeans++", fixed_weights=True, grad="none",
                    generator=_generator(seed, x0.device)).gmm
    warm = WarmStartEM(3, init=start, fixed_weights=True, n_init_iter=1, policy=None) if mode == "warm_start" else None
    prev = [start]
    peak = [0]
    frames = [x0.clone()]
    bar = _progress(None, quiet, f"flow {mode}", total=iters)

    @contextlib.contextmanager
    def metered():
        with SavedTensorMeter() as meter, warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            yield
        peak[0] = max(peak[0], meter.bytes)

    def record(step: int, energy, x) -> None:
        frames.append(x.clone())
        bar.update(1)

    flow = drive(x0, lambda x, _: mw2(_flow_gmm(mode, x, n_iter, prev, warm), target), iters=iters,
                    lr=lr * x0.shape[-2], max_step=MAX_STEP, callback=record, step_context=metered)
    bar.close()
    return {"energies": flow.losses, "frames": torch.stack(frames), "seconds": flow.seconds, "saved_bytes": peak[0]}


FLOW_THRESHOLDS = (1e-2, 1e-4, 1e-6)
MAX_STEP = 0.5  # trust region: no point moves further per step (the unrolled gradient spiked at seed 0)


def _first_below(values: list[float], threshold: float) -> int | None:
    """Index of the first step whose energy is below ``threshold`` (None if never)."""
    return next((i for i, v in enumerate(values) if v < threshold), None)


def _converged_energy(x, target, seed: int) -> float:
    from imgmw import fit_gmm
    from imgmw.ot import mw2

    fit = fit_gmm(x, 3, n_iter=200, init="kmeans++", fixed_weights=True, grad="none",
                  generator=_generator(seed, x.device))
    return float(mw2(fit.gmm, target))


def _flow_problem(seed: int, device, dtype):
    """``(x0 [200, 2], ν)``: points from a 3-component GMM and a different 3-component target."""
    import torch

    from imgmw import GMM

    gen = _generator(seed, device)
    t = dict(dtype=dtype, device=device)
    source = GMM(torch.full((3,), 1 / 3, **t), torch.tensor([[-2.0, 0.0], [0.0, 2.0], [2.0, 0.0]], **t),
                 torch.tensor([[[0.5, 0.2], [0.2, 0.3]], [[0.3, 0.0], [0.0, 0.3]], [[0.3, -0.1], [-0.1, 0.5]]], **t))
    target = GMM(torch.full((3,), 1 / 3, **t), torch.tensor([[0.0, -2.5], [3.0, 2.0], [-3.0, 2.0]], **t),
                 torch.tensor([[[1.0, 0.0], [0.0, 0.2]], [[0.2, 0.1], [0.1, 0.4]], [[0.5, -0.3], [-0.3, 0.5]]], **t))
    x0, _ = source.sample(200, generator=gen)
    return x0, target


def run_flow(args: argparse.Namespace) -> tuple[dict, dict]:
    device, dtype = _setup(args)
    _need_mw2("flow")
    iters = args.iters if args.iters is not None else (12 if args.quick else 150)
    n_iter, lr = 10, 0.1
    x0, target = _flow_problem(args.seed, device, dtype)
    results: dict[str, Any] = {"command": "flow", "n": 200, "K": 3, "d": 2, "fixed_weights": True, "iters": iters,
                               "em_steps": n_iter, "step": f"x <- x - {lr} * n * grad", "quick": args.quick,
                               "loss": "MW2^2(fit, target)",
                               "memory": "bytes of distinct storages saved for backward per step (peak over steps)",
                               "initial_energy": _converged_energy(x0, target, args.seed), "modes": {}}
    runs = {}
    for mode in (*MODES, "warm_start"):
        run = _flow_run(mode, x0, target, iters, lr, n_iter, args.seed, args.quiet)
        runs[mode] = run
        refit = _converged_energy(run["frames"][-1], target, args.seed)
        results["modes"][mode] = {"final_energy": refit, "refit_mw2": refit,
                                  "last_step_energy": run["energies"][-1] if run["energies"] else None,
                                  "final_loss": run["energies"][-1] if run["energies"] else None,
                                  "seconds": run["seconds"], "saved_bytes_peak": run["saved_bytes"],
                                  "steps_to": {f"{thr:g}": _first_below(run["energies"], thr)
                                               for thr in FLOW_THRESHOLDS},
                                  "energies": run["energies"]}
    return results, _flow_figures(runs, target, results)


def _ellipses(ax, gmm, **kw) -> None:
    """2-σ ellipses of a 2-D GMM's components."""
    import torch

    theta = torch.linspace(0, 2 * math.pi, 100, dtype=gmm.dtype, device=gmm.device)
    circle = 2.0 * torch.stack([theta.cos(), theta.sin()])
    for m, chol in zip(gmm.means, gmm.cholesky):
        pts = (m.unsqueeze(-1) + chol @ circle).cpu()
        ax.plot(pts[0], pts[1], **kw)


def _flow_figures(runs: dict, target, results: dict) -> dict:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 4), squeeze=False, sharex=True, sharey=True)
    for ax, (mode, trace) in zip(axes[0], runs.items()):
        frames = trace["frames"].cpu()
        for i in range(0, frames.shape[1], 4):
            ax.plot(frames[:, i, 0], frames[:, i, 1], lw=0.5, color="0.6")
        ax.scatter(frames[0, :, 0], frames[0, :, 1], s=4, color="0.7", label="start")
        ax.scatter(frames[-1, :, 0], frames[-1, :, 1], s=5, color="C3", label="end")
        _ellipses(ax, target, color="C0", lw=1)
        ax.set_title(f"{LABELS[mode]}: E={results['modes'][mode]['final_energy']:.3g}", fontsize=9)
        ax.set_aspect("equal")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig2, ax = plt.subplots(figsize=(5, 3.5))
    for mode, trace in runs.items():
        ax.semilogy(trace["energies"], label=f"{LABELS[mode]} ({trace['seconds']:.2g} s)")
    ax.set_xlabel("step")
    ax.set_ylabel("MW2²(fit, ν) seen by the step")
    ax.legend(fontsize=7)
    fig2.tight_layout()
    return {"flow_trajectories": fig, "flow_energy": fig2}


# --------------------------------------------------------------------------- stability
def _stability_truth(sep: float, seed: int, device, dtype):
    """A 3-component 2-D mixture with unit-scale covariances and pairwise mean distance ``sep``."""
    import torch

    from imgmw import GMM

    gen = _generator(seed, device)
    angles = torch.tensor([0.0, 2.0, 4.0], dtype=dtype, device=device) * math.pi / 3
    means = sep / math.sqrt(3) * torch.stack([angles.cos(), angles.sin()], -1)
    rot = random_rotation(3, 2, gen, dtype, device)
    cov = (rot * torch.tensor([1.0, 0.4], dtype=dtype, device=device)) @ rot.mT
    return GMM(torch.tensor([0.5, 0.3, 0.2], dtype=dtype, device=device), means, 0.5 * (cov + cov.mT))


def run_stability(args: argparse.Namespace) -> tuple[dict, dict]:
    device, dtype = _setup(args)
    mw2 = _need_mw2("stability")
    from imgmw import GMM, fit_gmm

    quick = args.quick
    n_values = [200, 800] if quick else [1000, 2000, 5000, 10000, 20000]
    repeats, n_iter = (4, 30) if quick else (40, 200)
    results: dict[str, Any] = {"command": "stability", "K": 3, "d": 2, "repeats": repeats, "em_steps": n_iter,
                               "init": "kmeans++", "quick": quick, "n_values": n_values,
                               "metric": "MW2^2(EM fit, truth)", "levels": {}}
    for li, (level, sep) in enumerate(SEPARATIONS.items()):
        truth = _stability_truth(sep, args.seed + li, device, dtype)
        rows = []
        for n in _progress(n_values, args.quiet, f"stability {level}"):
            gen = _generator(args.seed * 7919 + li * 101 + n, device)
            batch = GMM(truth.weights.expand(repeats, 3), truth.means.expand(repeats, 3, 2),
                        truth.covariances.expand(repeats, 3, 2, 2))
            x, _ = batch.sample(n, generator=gen)
            fit = fit_gmm(x, 3, n_iter=n_iter, init="kmeans++", grad="none", generator=gen)
            rows.append({"n": n, **quartiles(mw2(fit.gmm, truth))})
        slope = _loglog_slope([r["n"] for r in rows], [r["median"] for r in rows])
        results["levels"][level] = {"separation": sep, "rows": rows, "loglog_slope_of_median": slope}
    return results, _stability_figure(results)


def _loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x`` (NaN with fewer than two positive points)."""
    pts = [(math.log(a), math.log(b)) for a, b in zip(xs, ys) if a > 0 and b > 0]
    if len(pts) < 2:
        return math.nan
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    var = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / var


def _stability_figure(results: dict) -> dict:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ns = results["n_values"]
    for level, rec in results["levels"].items():
        _band(ax, ns, rec["rows"], f"{level} (slope {rec['loglog_slope_of_median']:.2f})")
    first = next(iter(results["levels"].values()))["rows"][0]["median"]
    ax.plot(ns, [first * (n / ns[0]) ** -0.5 for n in ns], "k:", label="n^-1/2")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("n")
    ax.set_ylabel("MW2²(EM fit, truth)")
    ax.legend(fontsize=7)
    ax.set_title(f"K=3, d=2, {results['repeats']} repeats, {results['em_steps']} EM steps", fontsize=9)
    fig.tight_layout()
    return {"stability": fig}


# --------------------------------------------------------------------------- scaling
def _dense_bytes(k: int, d: int, n: int, itemsize: int) -> int:
    """Memory of the dense AI Jacobians ``∂_φF̃ [p, p]`` and ``∂_X F̃ [p, n, d]``."""
    from imgmw.implicit import n_phi

    p = n_phi(k, d, False)
    return (p * p + p * n * d) * itemsize


def _backward_cost(mode: str, x, init, target_loss, n_iter: int) -> dict:
    """Forward/backward seconds and saved bytes of one ``fit_gmm`` + loss + backward."""
    import torch

    from imgmw import fit_gmm

    xx = x.clone().requires_grad_(True)
    solves = []
    opts = {"callback": solves.append} if mode == "implicit" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t0 = time.perf_counter()
        with SavedTensorMeter() as fwd:
            loss = target_loss(fit_gmm(xx, init.n_components, n_iter=n_iter, init=init, grad=mode,
                                       implicit_options=opts).gmm).sum()
        t1 = time.perf_counter()
        with SavedTensorMeter() as bwd:
            torch.autograd.grad(loss, xx)
        t2 = time.perf_counter()
    out = {"forward_s": t1 - t0, "backward_s": t2 - t1, "saved_forward_bytes": fwd.bytes,
           "saved_backward_bytes": bwd.bytes}
    if solves:
        out["solver_iterations"] = solves[-1].iterations
        out["solver_residual"] = float(solves[-1].residual.max())
    return out


def _dense_cost(x, init, target_loss, n_iter: int) -> dict:
    """Time of the dense AI gradient at θ_T (forward EM without graph + jacrev + solve)."""
    import torch

    from imgmw import GMM, fit_gmm
    from imgmw.implicit import dense_implicit_gradient

    t0 = time.perf_counter()
    theta = fit_gmm(x, init.n_components, n_iter=n_iter, init=init, grad="none").gmm
    leaves = [t.clone().requires_grad_(True) for t in (theta.weights, theta.means, theta.covariances)]
    g_theta = torch.autograd.grad(target_loss(GMM(*leaves)).sum(), leaves)
    dense_implicit_gradient(theta, x, g_theta)
    return {"total_s": time.perf_counter() - t0}


def _scaling_problem(d: int, n: int, seed: int, device, dtype):
    """``(x [1, n, d], k-means++ init, loss)`` for a separated 3-component mixture in ``d`` dimensions."""
    from imgmw.init import init_gmm

    gen = _generator(seed, device)
    truth = random_gmm(1, 3, d, 3.0, 4.0, gen, dtype, device)
    x, _ = truth.sample(n, generator=gen)
    loss, name = make_loss(shifted_target(truth))
    return x, init_gmm(x, 3, "kmeans++", generator=gen), loss, name


def run_scaling(args: argparse.Namespace) -> tuple[dict, dict]:
    device, dtype = _setup(args)
    from imgmw import fit_gmm

    quick = args.quick
    itemsize = 8 if args.dtype == "float64" else 4
    t_values = [1, 5, 20] if quick else [1, 2, 5, 10, 20, 50, 100, 200]
    d_values = [3, 16] if quick else [3, 6, 12, 24, 48, 96, 192]
    n_t, n_d = (200, 300) if quick else (1000, 2000)
    # d sweep: AD unrolls t_ad steps (its memory is linear in T, see the T sweep); IMP and OS run t_conv
    # steps, enough for EM to converge, which the implicit gradient assumes and which costs them no memory.
    t_ad, t_conv = (5, 30) if quick else (10, 100)
    steps = {"unrolled": t_ad, "one_step": t_conv, "implicit": t_conv}
    x, init, loss, name = _scaling_problem(3, n_t, args.seed, device, dtype)
    results: dict[str, Any] = {"command": "scaling", "K": 3, "quick": quick, "loss": name,
                               "memory": "bytes of distinct storages saved for backward (saved_tensors_hooks)",
                               "sweep_T": {"d": 3, "n": n_t, "rows": []},
                               "sweep_d": {"em_steps": steps, "n": n_d, "rows": [],
                                           "dense_limit_bytes": DENSE_LIMIT_BYTES}}
    for t in _progress(t_values, args.quiet, "scaling T"):
        row = {"T": t, **{m: _backward_cost(m, x, init, loss, t) for m in MODES}}
        results["sweep_T"]["rows"].append(row)
    _dense_cost(x, init, loss, 1)  # warm-up: functorch's one-time initialisation is not part of the timings
    for d in _progress(d_values, args.quiet, "scaling d"):
        xd, init_d, loss_d, _ = _scaling_problem(d, n_d, args.seed + d, device, dtype)
        row = {"d": d, **{m: _backward_cost(m, xd, init_d, loss_d, steps[m]) for m in MODES}}
        theta = fit_gmm(xd, 3, n_iter=t_conv, init=init_d, grad="none").gmm
        row["fixed_point_error_at_t_conv"] = float(fixed_point_error(theta, xd).max())
        dense = _dense_bytes(3, d, n_d, itemsize)
        row["dense_ai"] = {"estimated_bytes": dense}
        if dense <= DENSE_LIMIT_BYTES:
            row["dense_ai"].update(_dense_cost(xd, init_d, loss_d, t_conv))
        else:
            row["dense_ai"]["skipped"] = "dense Jacobians exceed the memory budget"
        results["sweep_d"]["rows"].append(row)
    return results, _scaling_figures(results)


def _scaling_figures(results: dict) -> dict:
    plt = _pyplot()
    figures = {}
    for sweep, axis in (("sweep_T", "T"), ("sweep_d", "d")):
        rows = results[sweep]["rows"]
        xs = [r[axis] for r in rows]
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.8))
        steps = results[sweep].get("em_steps", {})
        for mode in MODES:
            label = LABELS[mode] + (f" (T={steps[mode]})" if mode in steps else "")
            ax_t.plot(xs, [r[mode]["backward_s"] for r in rows], marker="o", label=label)
            ax_m.plot(xs, [r[mode]["saved_forward_bytes"] + r[mode]["saved_backward_bytes"] for r in rows],
                      marker="o", label=label)
        if sweep == "sweep_d":
            dense = [(r["d"], r["dense_ai"]) for r in rows]
            timed = [(dd, a["total_s"]) for dd, a in dense if "total_s" in a]
            if timed:
                ax_t.plot(*zip(*timed), marker="s", ls="--", label="AI (dense, total)")
            ax_m.plot([dd for dd, _ in dense], [a["estimated_bytes"] for _, a in dense], ls="--", marker="s",
                      label="AI dense Jacobians (estimate)")
            ax_m.axhline(DENSE_LIMIT_BYTES, color="0.5", lw=0.8, ls=":")
        for ax, title in ((ax_t, "backward time [s]"), (ax_m, "saved for backward [bytes]")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(axis)
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        figures[f"scaling_vs_{axis}"] = fig
    return figures


# --------------------------------------------------------------------------- entry point
RUNNERS = {"accuracy": run_accuracy, "flow": run_flow, "stability": run_stability, "scaling": run_scaling}


def _main(argv: list[str] | None) -> int:
    args = _parse(argv)
    out = args.output if args.output is not None else Path("outputs") / PROG / args.command
    check_output(out)  # before the study: an unusable --output is reported at once
    results, figures = RUNNERS[args.command](args)
    results["seed"], results["device"], results["dtype"] = args.seed, args.device, args.dtype
    names = _write(out, results, figures)
    print(f"{PROG} {args.command}: wrote {', '.join(names)} in {out}/")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2: one line on stderr for a bad command line, an
    unusable --output or a diverging flow; 130: interrupted)."""
    try:
        return run(PROG, _main, argv)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)


if __name__ == "__main__":
    sys.exit(main())
