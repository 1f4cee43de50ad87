"""The 2-D particle flow ``min_X MW2²(EM fit of X, ν)`` driven by each gradient through EM.

200 points, K=3 with fixed uniform weights, gradient steps ``x ← x − lr·n·∇E(x)`` (:func:`imgmw.run_flow`,
each point's step capped at :data:`MAX_STEP`). Measured per gradient mode: the energies seen by the steps,
the energy of a fresh converged fit of the final points (``final_energy``, ``refit_mw2``), wall time, the
peak bytes saved for backward per step (:class:`SavedTensorMeter`), and the trajectories.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..em import fit_gmm
from ..flow import run_flow
from ..gmm import GMM
from ..ot import mw2
from ..warm import WarmStartEM
from .measures import first_below
from .memory import SavedTensorMeter
from .problems import MODES, Progress, flow_problem, seeded

__all__ = ["FLOW_MODES", "FLOW_THRESHOLDS", "MAX_STEP", "FlowStudy", "converged_energy", "flow_run", "flow_study"]

FLOW_MODES = (*MODES, "warm_start")  # warm_start: the paper's Algorithm 3 (WarmStartEM without fit policy)
FLOW_THRESHOLDS = (1e-2, 1e-4, 1e-6)  # results record the first step whose energy is below each
MAX_STEP = 0.5  # trust region: no point moves further per step (the unrolled gradient spiked at seed 0)
N_COMPONENTS = 3


class FlowStudy(NamedTuple):
    """What :func:`flow_study` returns: the JSON-able ``results``, the ``trajectories`` ``{mode: [S+1, N, 2]}``
    (the points before the first and after every step) and the ``target`` mixture ``ν``."""

    results: dict[str, Any]
    trajectories: dict[str, Tensor]
    target: GMM


def converged_energy(x: Tensor, target: GMM, seed: int) -> float:
    """``MW2²`` between a fresh fit of ``x [N, D]`` (k-means++ from ``seed``, 200 EM steps, fixed uniform
    weights) and ``target``: the energy the points really have, whatever fit a flow step used."""
    fit = fit_gmm(x, N_COMPONENTS, n_iter=200, init="kmeans++", fixed_weights=True, grad="none",
                  generator=seeded(seed, x.device))
    return float(mw2(fit.gmm, target))


def flow_run(mode: str, x0: Tensor, target: GMM, *, n_iter: int, lr: float, em_n_iter: int, seed: int,
             progress: Progress | None = None) -> dict[str, Any]:
    """One flow from ``x0 [N, D]`` with the gradient ``mode`` (:data:`FLOW_MODES`).

    Every mode follows one EM optimum as the points move: ``em_n_iter`` EM steps (gradient ``mode``) from the
    previous step's detached fit, or the warm start's one step; fresh k-means++ starts at every step jumped
    between optima and the flow diverged (seeds 0 and 1, unrolled and implicit).

    Returns ``{"energies": [S] floats, "frames": [S+1, N, D], "seconds", "saved_bytes": peak per step}``.
    """
    start = fit_gmm(x0, N_COMPONENTS, n_iter=10, init="kmeans++", fixed_weights=True, grad="none",
                    generator=seeded(seed, x0.device)).gmm
    warm = (WarmStartEM(N_COMPONENTS, init=start, fixed_weights=True, n_init_iter=1, policy=None)
            if mode == "warm_start" else None)
    prev = [start]
    peak = [0]
    frames = [x0.clone()]
    desc = f"flow {mode}"

    def fit(x: Tensor) -> GMM:
        if warm is not None:
            return warm(x)
        gmm = fit_gmm(x, N_COMPONENTS, n_iter=em_n_iter, init=prev[0], fixed_weights=True, grad=mode).gmm
        prev[0] = gmm.detach()
        return gmm

    @contextlib.contextmanager
    def metered() -> Iterator[None]:
        with SavedTensorMeter() as meter, warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            yield
        peak[0] = max(peak[0], meter.bytes)

    def record(step: int, energy: Tensor, x: Tensor) -> None:
        frames.append(x.clone())
        if progress is not None:
            progress(desc, len(frames) - 1, n_iter)

    if progress is not None:
        progress(desc, 0, n_iter)
    flow = run_flow(x0, lambda x, _: mw2(fit(x), target), n_iter=n_iter, lr=lr * x0.shape[-2], max_step=MAX_STEP,
                    callback=record, step_context=metered)
    return {"energies": flow.losses, "frames": torch.stack(frames), "seconds": flow.seconds, "saved_bytes": peak[0]}


def flow_study(*, n_iter: int = 150, em_n_iter: int = 10, lr: float = 0.1, seed: int = 0,
               device: torch.device | str | None = None, dtype: torch.dtype = torch.float64,
               progress: Progress | None = None) -> FlowStudy:
    """The flow of :func:`flow_problem`'s points towards its target with every mode of :data:`FLOW_MODES`.

    Args:
        n_iter: flow steps; em_n_iter: EM steps per flow step (the warm start takes one); lr: step size per
            point (the flow's ``lr`` is ``lr·n``); seed: the problem's points and the k-means++ starts.
        progress: optional ``progress(description, done, total)`` called after each flow step.

    Returns:
        :class:`FlowStudy`; its ``results["modes"][mode]`` holds ``final_energy`` (= ``refit_mw2``, a fresh fit's
        MW2²), ``last_step_energy`` (= ``final_loss``), ``seconds``, ``saved_bytes_peak``, ``steps_to``
        (first step below each of :data:`FLOW_THRESHOLDS`) and ``energies``.
    """
    x0, target = flow_problem(seed, device, dtype)
    results: dict[str, Any] = {"command": "flow", "n": x0.shape[-2], "K": N_COMPONENTS, "d": 2, "fixed_weights": True,
                               "iters": n_iter, "em_steps": em_n_iter, "step": f"x <- x - {lr} * n * grad",
                               "loss": "MW2^2(fit, target)",
                               "memory": "bytes of distinct storages saved for backward per step (peak over steps)",
                               "initial_energy": converged_energy(x0, target, seed), "modes": {}}
    trajectories = {}
    for mode in FLOW_MODES:
        run = flow_run(mode, x0, target, n_iter=n_iter, lr=lr, em_n_iter=em_n_iter, seed=seed, progress=progress)
        trajectories[mode] = run["frames"]
        refit = converged_energy(run["frames"][-1], target, seed)
        last = run["energies"][-1] if run["energies"] else None
        results["modes"][mode] = {"final_energy": refit, "refit_mw2": refit, "last_step_energy": last,
                                  "final_loss": last, "seconds": run["seconds"], "saved_bytes_peak": run["saved_bytes"],
                                  "steps_to": {f"{thr:g}": first_below(run["energies"], thr)
                                               for thr in FLOW_THRESHOLDS},
                                  "energies": run["energies"]}
    return FlowStudy(results, trajectories, target)
