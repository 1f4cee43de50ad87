"""The one optimisation driver for points and pixels moved by MW2 losses, and the refit diagnostic.

:func:`run_flow` minimises ``E(x) = Σ objective(x, t)`` over a tensor ``x`` (colours, point clouds,
pixels) with one of three step rules:

- ``"gd"``: explicit Euler steps of a gradient flow, ``x ← x − lr·s(t)·∇E / ω̂`` with optional point
  masses ``ω̂`` (``[*B, N]``, summing to one per batch element): the **Wasserstein gradient step** of
  ``E`` on the measure ``Σ_i ω̂_i δ_{x_i}``, which moves every point at the speed of the flow's velocity
  field whatever its mass. ``max_step`` caps the length of every point's step (a per-point trust region:
  through the responsibilities, points between two narrow components get gradients of order ``Σ⁻¹``).
- ``"adam"``: :class:`torch.optim.Adam` (its step scaled by the schedule).
- ``"lbfgs"``: :class:`torch.optim.LBFGS` with a strong-Wolfe line search, one L-BFGS iteration per step;
  the objective is evaluated several times per step with the same ``t`` (objectives that draw random
  patches should draw once per ``t``).

The schedule ``s(t)`` is ``"constant"``, ``"linear"`` (from 1 to 0 over ``n_iter``) or a callable.
``project(x)`` runs in place after every step (e.g. clamping pixels to [0, 1]); ``callback(t, E_t, x)``
after every step; ``stop(history)`` ends the flow early (see :func:`plateau`). A non-finite loss or
point, a loss above ``divergence_factor ×`` the largest of the first ``DIVERGENCE_WARMUP`` losses, or
``DIVERGENCE_WARMUP`` losses in a row above ``STALL_GROWTH ×`` the starting loss (a step so large that the
projection pins the variables to a worse state, e.g. Adam with ``lr = 1e30`` on pixels clamped to [0, 1])
raises :class:`FlowDivergence`, which names the step size. A descent flow never sits at ten times its
starting loss. The ``"gd"`` cap divides by each point's step length computed without overflow, so a
huge ``lr`` with ``max_step`` takes steps of length ``max_step`` (before: an overflowing norm made it a
silent no-op).

**Host synchronisation.** The ``"gd"`` and ``"adam"`` steps never read a device value on the host: the
losses ``E_t`` and a flag "``x_{t+1}`` is finite" are kept on the device and read in one transfer every
``sync_every`` steps (and after the last step). At those *sync points* the divergence rules are checked for
every step of the batch in order (so a divergence is reported at the step where it happened, at most
``sync_every − 1`` steps later), :attr:`FlowResult.losses` grows and ``stop`` is asked. ``callback``
runs after every step with ``E_t`` as a 0-d device tensor: reading it (``float(E_t)``) synchronises, so a
progress display should read it only at sync points (``(t + 1) % SYNC_EVERY == 0``), where the device
queue has just been drained and the read is free. If the objective raises between sync points (e.g. on
non-finite points), the pending steps are checked first, and a divergence among them is reported as
:class:`FlowDivergence`. ``sync_every=1`` checks every step (the earlier behaviour). L-BFGS's line search
reads values on the host by itself.

:func:`refit_mw2` answers whether a loss still describes its points: the ``MW2²`` between a **fresh** EM
fit of the points (k-means++, ``n_iter`` steps, best of ``n_init`` seeds by likelihood) and the target. A
warm-started loss far below it has stopped describing the data (:mod:`imgmw.warm`).
"""
from __future__ import annotations

import abc
import contextlib
import math
import time
from dataclasses import dataclass, field
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .deprecation import renamed_parameters
from .em import fit_gmm
from .gmm import GMM
from .ot import mw2
from .validation import check_choice, check_points

__all__ = ["STEP_RULES", "SCHEDULES", "SYNC_EVERY", "FlowDivergence", "FlowResult", "run_flow", "plateau",
           "check_divergence", "guarded_step", "StepTrainer", "refit_mw2"]

STEP_RULES = ("gd", "adam", "lbfgs")
SCHEDULES = ("constant", "linear")
DIVERGENCE_WARMUP = 5  # losses of the first steps that set the divergence reference
STALL_GROWTH = 10.0    # this many times the starting loss, DIVERGENCE_WARMUP steps in a row: diverged
SYNC_EVERY = 10        # run_flow's steps between host reads of the losses (progress, divergence, stop)

Objective = Callable[[Tensor, int], Tensor]
Callback = Callable[[int, Tensor, Tensor], None]


class FlowDivergence(ArithmeticError):
    """The flow's loss or points became non-finite or exploded: the step size is too large."""


@dataclass
class FlowResult:
    """Output of :func:`run_flow`.

    Attributes:
        x: the final (detached) variables, same shape as the start.
        losses: ``E_t`` (summed terms) before every step taken, as Python floats (read from the device at
            the sync points; complete when :func:`run_flow` returns).
        terms: ``[T, *S]`` the objective's terms (its output, detached) at every step.
        n_steps: steps taken (``< n_iter`` when ``stop`` ended the flow).
        stopped: whether ``stop`` ended the flow.
        seconds: wall time of the loop.
    """

    x: Tensor
    losses: list[float] = field(default_factory=list)
    terms: Tensor | None = None
    n_steps: int = 0
    stopped: bool = False
    seconds: float = 0.0

    @property
    def final_loss(self) -> float:
        """The last recorded loss (``nan`` when no step ran)."""
        return self.losses[-1] if self.losses else math.nan


def plateau(tol: float = 1e-4, window: int = 20) -> Callable[[list[float]], bool]:
    """A stopping rule: the mean loss of the last ``window`` steps fell by less than ``tol`` (relative)
    against the ``window`` steps before."""
    if not (tol >= 0) or not isinstance(window, int) or window < 1:
        raise ValueError(f"plateau needs tol >= 0 and an integer window >= 1, got tol={tol!r}, window={window!r}")

    def stop(history: list[float]) -> bool:
        if len(history) < 2 * window:
            return False
        recent = sum(history[-window:]) / window
        before = sum(history[-2 * window:-window]) / window
        return before - recent <= tol * abs(before)

    return stop


def _factor(schedule: str | Callable[[int], float], step: int, n_iter: int) -> float:
    if callable(schedule):
        return float(schedule(step))
    return 1.0 if schedule == "constant" else 1.0 - step / n_iter


def _check_args(x: Tensor, n_iter: int, lr: float, step: str, schedule, point_mass: Tensor | None,
                max_step: float | None, precondition, divergence_factor: float, sync_every: int) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = type(x).__name__ if not isinstance(x, Tensor) else x.dtype
        raise ValueError(f"x must be a floating-point tensor, got {got}")
    if not isinstance(n_iter, int) or isinstance(n_iter, bool) or n_iter < 0:
        raise ValueError(f"n_iter must be an integer >= 0, got {n_iter!r}")
    if not (isinstance(lr, (int, float)) and 0 < lr < math.inf):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    check_choice("step", step, STEP_RULES)
    if not callable(schedule):
        check_choice("schedule", schedule, SCHEDULES)
    for name, value in (("point_mass", point_mass), ("max_step", max_step), ("precondition", precondition)):
        if value is not None and step != "gd":
            raise ValueError(f"{name} applies to the 'gd' step rule only")
    if point_mass is not None:
        if point_mass.shape != x.shape[:-1] or not bool((point_mass > 0).all()):
            raise ValueError(f"point_mass must be positive with shape {tuple(x.shape[:-1])}, got "
                             f"{tuple(point_mass.shape)}")
    if max_step is not None and not (0 < max_step < math.inf):
        raise ValueError(f"max_step must be a finite number > 0 or None, got {max_step!r}")
    if not divergence_factor > 1:
        raise ValueError(f"divergence_factor must be > 1, got {divergence_factor!r}")
    if not isinstance(sync_every, int) or isinstance(sync_every, bool) or sync_every < 1:
        raise ValueError(f"sync_every must be an integer >= 1, got {sync_every!r}")


class _LossRecord:
    """The losses of a flow, kept on the device and read by the host in batches.

    Every step appends ``E_t`` (a 0-d tensor) and whether the variables after the step are all finite (a 0-d
    bool tensor); :meth:`sync` reads all pending values in one transfer, appends the losses to ``losses``
    and applies the divergence rules of :func:`check_divergence` to every pending step in order."""

    def __init__(self, losses: list[float], lr: float, factor: float) -> None:
        self.losses, self.lr, self.factor = losses, lr, factor
        self.pending_loss: list[Tensor] = []
        self.pending_finite: list[Tensor] = []

    def add(self, value: Tensor, var: Tensor) -> Tensor:
        """Record the step's terms ``value`` and the variables ``var`` after it; returns ``E_t`` (0-d, on the
        device)."""
        loss = value.detach().sum()
        self.pending_loss.append(loss)
        self.pending_finite.append(torch.isfinite(var.detach()).all())
        return loss

    def sync(self) -> None:
        """Read the pending steps (one host synchronisation) and raise :class:`FlowDivergence` at the first
        that diverged."""
        if not self.pending_loss:
            return
        n = len(self.pending_loss)
        host = torch.cat([torch.stack(self.pending_loss).double(), torch.stack(self.pending_finite).double()]).tolist()
        self.pending_loss, self.pending_finite = [], []
        for loss, finite in zip(host[:n], host[n:]):
            self.losses.append(loss)
            message = _loss_divergence(self.losses, self.factor)
            if message is None and not finite:
                message = f"at step {len(self.losses) - 1}: the variables became non-finite"
            if message is not None:
                raise FlowDivergence(f"the flow diverged {message}; lower the step size (lr={self.lr:g})")


@renamed_parameters(iters="n_iter")
def run_flow(x: Tensor, objective: Objective, *, n_iter: int, lr: float, step: str = "gd",
             schedule: str | Callable[[int], float] = "constant", point_mass: Tensor | None = None,
             max_step: float | None = None, project: Callable[[Tensor], object] | None = None,
             callback: Callback | None = None, stop: Callable[[list[float]], bool] | None = None,
             divergence_factor: float = 1e6, precondition: Callable[[Tensor], Tensor] | None = None,
             step_context: Callable[[], contextlib.AbstractContextManager] | None = None,
             sync_every: int = SYNC_EVERY) -> FlowResult:
    """Minimise ``Σ objective(x, t)`` over ``x`` from the given start (see the module docstring).

    Args:
        x: starting variables (any shape; ``[*B, N, D]`` points for ``point_mass`` / ``max_step``); not modified.
        objective: ``objective(x, t) -> Tensor`` differentiable in ``x``; its entries are the loss terms
            (recorded in :attr:`FlowResult.terms`) and their sum is minimised.
        n_iter: maximum number of steps (the old name ``iters`` still works, with a DeprecationWarning).
        lr: step size (``τ`` of the ``"gd"`` rule, the learning rate of Adam / L-BFGS).
        step: ``"gd"``, ``"adam"`` or ``"lbfgs"``.
        schedule: ``"constant"``, ``"linear"`` or ``schedule(t) -> factor`` multiplying ``lr``.
        point_mass: ``ω̂ [*B, N]`` (``"gd"``): divide each point's gradient by its mass.
        max_step: ``"gd"``: cap on the Euclidean length of each point's step (over the last dimension).
        precondition: ``"gd"``: a map applied to every step before the cap (e.g. a smoothing of the velocity
            field over the points).
        project: in-place projection after every step.
        callback: ``callback(t, E_t, x)`` after every step: ``E_t`` the summed terms as a detached 0-d tensor on
            ``x``'s device (read it at sync points only, see the module docstring), ``x`` detached, after the step.
        stop: ``stop(losses) -> bool`` asked at every sync point with all losses so far (Python floats); the flow
            then ends at that step (so up to ``sync_every − 1`` steps after the rule first held).
        divergence_factor: a loss above this multiple of the early losses' maximum is a divergence.
        step_context: a factory of a context manager entered around each step's evaluations, backward
            passes and update (e.g. a meter of the tensors saved for backward).
        sync_every: steps between the host reads of the losses (divergence checks, ``stop``); also after the
            last step.

    Raises:
        FlowDivergence: non-finite or exploding loss or variables; the message names ``lr``.
    """
    _check_args(x, n_iter, lr, step, schedule, point_mass, max_step, precondition, divergence_factor, sync_every)
    var = x.detach().clone().requires_grad_(True)
    opt: torch.optim.Optimizer | None = None
    if step == "adam":
        opt = torch.optim.Adam([var], lr=lr)
    elif step == "lbfgs":
        opt = torch.optim.LBFGS([var], lr=lr, max_iter=1, history_size=10, line_search_fn="strong_wolfe")
    inv_mass = None if point_mass is None else point_mass.detach().to(var).reciprocal().unsqueeze(-1)
    result = FlowResult(var.detach())
    record = _LossRecord(result.losses, lr, divergence_factor)
    terms: list[Tensor] = []
    start = time.perf_counter()
    for t in range(n_iter):
        try:
            with (step_context() if step_context is not None else contextlib.nullcontext()):
                value = _step(var, objective, t, lr * _factor(schedule, t, n_iter), opt, inv_mass, max_step,
                              precondition)
        except (ValueError, RuntimeError, ArithmeticError) as err:  # a diverged step may fail the objective
            try:
                record.sync()
            except FlowDivergence as divergence:
                raise divergence from err
            raise
        if project is not None:
            with torch.no_grad():
                project(var)
        loss = record.add(value, var)
        terms.append(value.detach())
        result.n_steps = t + 1
        if (t + 1) % sync_every == 0 or t + 1 == n_iter:
            record.sync()
        if callback is not None:
            callback(t, loss, var.detach())
        if stop is not None and len(result.losses) == t + 1 and stop(result.losses):
            result.stopped = True
            break
    result.seconds = time.perf_counter() - start
    result.x = var.detach()
    result.terms = torch.stack(terms) if terms else None
    return result


def _step(var: Tensor, objective: Objective, t: int, lr: float, opt: torch.optim.Optimizer | None,
          inv_mass: Tensor | None, max_step: float | None, precondition: Callable[[Tensor], Tensor] | None) -> Tensor:
    """One step of the rule on ``var`` in place; returns the objective's terms at its first evaluation."""
    if opt is None:
        value = objective(var, t)
        (grad,) = torch.autograd.grad(value.sum(), var)
        with torch.no_grad():
            delta = lr * grad if inv_mass is None else lr * inv_mass * grad
            if precondition is not None:
                delta = precondition(delta)
            if max_step is not None:
                delta = delta * (max_step / _step_length(delta).clamp_min(max_step))
            var -= delta
        return value
    for group in opt.param_groups:
        group["lr"] = lr
    first: list[Tensor] = []

    def closure() -> Tensor:
        opt.zero_grad(set_to_none=True)
        out = objective(var, t)
        total = out.sum()
        total.backward()
        if not first:
            first.append(out.detach())
        return total

    try:
        opt.step(closure)  # type: ignore[arg-type]  # the stub says float; LBFGS takes the loss tensor
    except (ValueError, RuntimeError) as err:
        if not first:  # the objective failed at the step's own start: not the step size's fault
            raise
        raise FlowDivergence(f"the flow diverged at step {t}: the objective failed at a trial point of the line "
                             f"search ({err}); lower the step size (lr={lr:g})") from err
    return first[0]


def _step_length(delta: Tensor) -> Tensor:
    """``‖δ‖ [..., 1]`` over the last dimension without overflow and without a host branch.

    ``‖δ‖ = ‖2⁻ᵏ δ‖ · 2ᵏ`` with the smallest integer ``k ≥ 0`` that brings ``max |δ|`` below ``2^(e/2 − 8)``
    (``2^e`` the dtype's largest power of two), so that the sum of squares cannot overflow for up to ``2¹⁶``
    coordinates (a huge ``lr``). Scaling by a power of two is exact: when no scaling is needed (``k = 0``)
    this is ``‖δ‖`` to the last bit."""
    exponent = math.floor(math.log2(torch.finfo(delta.dtype).max))
    top = torch.linalg.vector_norm(delta, float("inf"))
    k = (torch.log2(top).ceil() - (exponent // 2 - 8)).clamp_min(0)
    return torch.linalg.vector_norm(delta * torch.exp2(-k), dim=-1, keepdim=True) * torch.exp2(k)


def _loss_divergence(losses: list[float], factor: float) -> str | None:
    """What the losses so far (``losses[t]`` before step ``t``) say about the last step: ``None``, or the
    end of a divergence message ("at step t: ..."; rules in the module docstring)."""
    t, loss = len(losses) - 1, losses[-1]
    if not math.isfinite(loss):
        return f"at step {t}: the loss became {loss}"
    reference = max(abs(v) for v in losses[:DIVERGENCE_WARMUP])
    if reference > 0 and loss > factor * reference:
        return f"at step {t}: the loss grew to {loss:.3g} from {reference:.3g}"
    recent = losses[-DIVERGENCE_WARMUP:]
    if t >= DIVERGENCE_WARMUP and losses[0] > 0 and min(recent) > STALL_GROWTH * losses[0]:
        return (f"from step {t + 1 - DIVERGENCE_WARMUP} to {t}: the loss stayed above {min(recent):.3g}, more "
                f"than {STALL_GROWTH:g}x its starting {losses[0]:.3g}")
    return None


def check_divergence(losses: list[float], variables: Tensor | Sequence[Tensor], lr: float, *,
                     factor: float = 1e6, what: str = "flow") -> None:
    """Raise :class:`FlowDivergence` (naming ``lr``) when the losses so far (``losses[t]`` after step ``t``)
    and the ``variables`` after the last step show a divergence (see the module docstring): a non-finite
    last loss or variable, a last loss above ``factor ×`` the largest of the first ``DIVERGENCE_WARMUP``
    losses, or ``DIVERGENCE_WARMUP`` losses in a row above ``STALL_GROWTH ×`` the first. Used by the
    generator trainers (:func:`guarded_step`); :func:`run_flow` applies the same rules at its sync points.
    One host synchronisation."""
    message = _loss_divergence(losses, factor)
    if message is None:
        tensors = [variables] if isinstance(variables, Tensor) else list(variables)
        if not bool(torch.stack([torch.isfinite(v).all() for v in tensors]).all()):
            message = f"at step {len(losses) - 1}: the variables became non-finite"
    if message is not None:
        raise FlowDivergence(f"the {what} diverged {message}; lower the step size (lr={lr:g})")


@torch.no_grad()
def refit_mw2(points: Tensor, target: GMM, *, n_components: int | None = None, fixed_weights: bool = False,
              reg_covar: float = 1e-6, sample_weight: Tensor | None = None, mask: Tensor | None = None,
              n_iter: int = 100, n_init: int = 3, unbalanced: tuple[float, float] | None = None,
              generator: torch.Generator | None = None) -> Tensor:
    """``MW2²`` (or ``UMW2²``) between a fresh EM fit of ``points [*B, N, D]`` and ``target`` (batch ``*B``).

    The fit: ``n_components`` (default: the target's ``K``) components, k-means++ start, ``n_iter`` EM steps,
    best of ``n_init`` starts by mean log-likelihood per batch element; ``fixed_weights``, ``reg_covar``,
    ``sample_weight`` and ``mask`` as the loss being checked uses them. Returns ``[*B]``.
    """
    check_points(points)
    k = target.n_components if n_components is None else n_components
    if not isinstance(n_init, int) or n_init < 1:
        raise ValueError(f"n_init must be an integer >= 1, got {n_init!r}")
    best: GMM | None = None
    best_ll: Tensor | None = None
    for _ in range(n_init):
        fit = fit_gmm(points.detach(), k, n_iter=n_iter, fixed_weights=fixed_weights, reg_covar=reg_covar,
                      grad="none", mask=mask, sample_weight=sample_weight, generator=generator)
        if best is None or best_ll is None:
            best, best_ll = fit.gmm, fit.lower_bound
            continue
        better = fit.lower_bound > best_ll
        best = GMM.where(better, fit.gmm, best)
        best_ll = torch.maximum(best_ll, fit.lower_bound)
    assert best is not None
    return mw2(best, target.to(best.means), unbalanced=unbalanced)


def guarded_step(loss: Tensor, optimizer: torch.optim.Optimizer, params: Sequence[Tensor],
                 history: list[float], *, max_grad_norm: float | None = None) -> float:
    """One optimiser step on the scalar ``loss`` of a training loop, between two :func:`check_divergence`
    checks (the second catches a step that made the weights non-finite before a checkpoint can store
    them); appends the loss's value to ``history`` and returns it. ``max_grad_norm``: clip the gradients'
    total norm before the step."""
    value = float(loss.detach())
    group = optimizer.param_groups[0]
    lr = group.get("initial_lr", group["lr"])  # the configured rate, not the schedule's current value
    check_divergence(history + [value], params, lr, what="training")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    check_divergence(history + [value], params, lr, what="training")
    history.append(value)
    return value


class StepTrainer(abc.ABC):
    """The loop shared by the generator trainers: subclasses define ``step() -> float`` and keep
    ``step_count`` and ``history``."""

    step_count: int
    history: list[float]

    @abc.abstractmethod
    def step(self) -> float:
        """One training step; returns its loss."""

    @renamed_parameters(iters="n_iter")
    def train(self, n_iter: int, callback: Callable[[int, float, StepTrainer], None] | None = None) -> list[float]:
        """``n_iter`` steps; ``callback(step, loss, trainer)`` after each: the flows' signature (step, loss,
        state) with ``step`` the index of the step just taken, counted from the first ever step (0-based, so
        ``step + 1`` steps are done) and ``loss`` its value (a float: the trainers read it anyway)."""
        for _ in range(n_iter):
            value = self.step()
            if callback is not None:
                callback(self.step_count - 1, value, self)
        return self.history
