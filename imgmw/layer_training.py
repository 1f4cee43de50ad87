"""Training :class:`imgmw.layers.EMLayer` on synthetic Gaussian-mixture data sets, and its held-out comparison
with plain EM (the library side of ``python -m apps.em_operator``).

Each training step draws a fresh batch of random ``K``-component mixtures in ``D`` dimensions
(:func:`random_mixtures`), samples ``N`` points from each, starts every set from a seeded k-means++ fit
(:func:`imgmw.init.init_gmm`) and takes one Adam step on the per-point negative log-likelihood of the mixture
the layer fits to it (``T`` unrolled EM steps with learned residual corrections, :func:`imgmw.layers.nll_loss`).
The batch of step ``t`` is a pure function of ``(seed, t)``, so a resumed run replays the same stream.

:func:`evaluate` compares, on held-out sets drawn from a fixed seed and from the **same k-means++ start per
set**, plain EM with ``T`` steps, the layer with ``T`` steps and plain EM with ``10·T`` steps, by the mean
log-likelihood per point, and reports the fraction of the gap between the two plain-EM rows that the layer
closes.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .deprecation import renamed_parameters
from .em import fit_gmm
from .flow import StepTrainer, guarded_step
from .gmm import GMM
from .init import init_gmm
from .layers import EMLayer, nll_loss

__all__ = ["random_mixtures", "sets_with_starts", "LayerTrainer", "evaluate", "EVAL_SEED", "EVAL_SETS",
           "SEPARATION", "COV_MIN", "WEIGHT_SPREAD", "MAX_GRAD_NORM"]

EVAL_SEED = 20250902  # held-out sets and their k-means++ starts: fixed, independent of the training seed
EVAL_SETS = 256
# Shape of the random mixtures: means ~ N(0, SEPARATION² I); each covariance has a random orientation
# and eigenvalues log-uniform in [COV_MIN, 1]; weights softmax(N(0, WEIGHT_SPREAD²)).
SEPARATION = 2.0
COV_MIN = 0.05
WEIGHT_SPREAD = 0.5
MAX_GRAD_NORM = 1.0  # gradient clipping of every training step


@renamed_parameters(k="n_components", d="n_features")
def random_mixtures(n_sets: int, n_components: int, n_features: int, generator: torch.Generator,
                    device: torch.device | str = "cpu") -> GMM:
    """``n_sets`` random ``K``-component mixtures in ``D`` dims (batch ``[n_sets]``; the module constants give
    their shape): Haar-distributed orientations, log-uniform eigenvalues, softmax-normal weights."""
    k, d = n_components, n_features

    def draw(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, device=device)

    logits = WEIGHT_SPREAD * draw(n_sets, k)
    means = SEPARATION * draw(n_sets, k, d)
    q, r = torch.linalg.qr(draw(n_sets, k, d, d))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # Haar-distributed rotations
    eig = COV_MIN ** torch.rand(n_sets, k, d, generator=generator, device=device)
    cov = (q * eig.unsqueeze(-2)) @ q.mT
    return GMM(torch.softmax(logits, -1), means, 0.5 * (cov + cov.mT))


@renamed_parameters(k="n_components", d="n_features")
def sets_with_starts(n_sets: int, n_components: int, n_features: int, n_points: int, generator: torch.Generator,
                     device: torch.device | str = "cpu") -> tuple[Tensor, GMM]:
    """Points ``[n_sets, N, D]`` from fresh random mixtures and their k-means++ starts (batch ``[n_sets]``), all
    drawn with ``generator`` (on ``device``)."""
    x, _ = random_mixtures(n_sets, n_components, n_features, generator, device).sample(n_points, generator=generator)
    return x, init_gmm(x, n_components, "kmeans++", generator=generator)


def _batch_seed(seed: int, step: int) -> int:
    """Seed of training batch ``step``: a pure function of (seed, step), so a resumed run replays the stream."""
    return (seed * 1_000_003 + step + 1) % (1 << 62)


@torch.no_grad()
def plain_em_nll(x: Tensor, init: GMM, n_iter: int) -> float:
    """Per-point negative log-likelihood of plain EM with ``n_iter`` steps from ``init``, mean over the sets."""
    return -float(fit_gmm(x, init.n_components, n_iter=n_iter, init=init, grad="none").gmm.log_prob(x).mean())


class LayerTrainer(StepTrainer):
    """Adam on an :class:`EMLayer` (``init="given"``: the k-means++ start of each set is passed in), its
    learning rate cosine-decayed from ``lr`` to 0 over ``total_steps``, gradients clipped at ``MAX_GRAD_NORM``.

    Args:
        layer: the layer (``K``, ``D`` and ``T`` are its ``n_components``, ``n_features``, ``n_iter``).
        n_points: points ``N`` per set; batch: sets per step; seed: of the training stream.

    ``history`` holds the per-point training loss of every step and ``em_history`` the same quantity for plain
    EM (``T`` steps, same start) on the same batch: their difference, the layer's gain, is far less noisy than
    the loss (sets differ in how well any mixture can fit them).
    """

    def __init__(self, layer: EMLayer, *, n_points: int, batch: int, lr: float, total_steps: int, seed: int) -> None:
        self.layer, self.n_points, self.batch, self.seed = layer, n_points, batch, seed
        self.device = next(layer.parameters()).device
        self.optimizer = torch.optim.Adam(layer.parameters(), lr=lr)
        total = max(total_steps, 1)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        self.step_count = 0
        self.history: list[float] = []
        self.em_history: list[float] = []

    def step(self) -> float:
        """One step on a fresh batch; returns its loss."""
        layer = self.layer
        gen = torch.Generator(device=self.device).manual_seed(_batch_seed(self.seed, self.step_count))
        x, init = sets_with_starts(self.batch, layer.n_components, layer.n_features, self.n_points, gen, self.device)
        loss = nll_loss(layer(x, init=init)[2], n_points=self.n_points)
        value = guarded_step(loss, self.optimizer, list(layer.parameters()), self.history,
                             max_grad_norm=MAX_GRAD_NORM)
        self.schedule.step()
        self.em_history.append(plain_em_nll(x, init, layer.n_iter))
        self.step_count += 1
        return value

    def recent_gain(self, window: int = 50) -> float:
        """Mean of (plain EM's loss − the layer's) over the last ``window`` steps (0 before the first)."""
        loss, em = self.history[-window:], self.em_history[-window:]
        return (sum(em) - sum(loss)) / len(loss) if loss else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.layer.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.schedule.state_dict(), "step": self.step_count,
                "history": {"loss": list(self.history), "em_loss": list(self.em_history)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.layer.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        self.step_count = int(state["step"])
        self.history = [float(v) for v in state["history"]["loss"]]
        self.em_history = [float(v) for v in state["history"]["em_loss"]]


def evaluate(layer: EMLayer, *, n_points: int, n_sets: int = EVAL_SETS) -> dict[str, float]:
    """Held-out mean log-likelihood per point of plain EM (``T`` and ``10·T`` steps) and of the layer (``T``),
    all from the same k-means++ start per set: ``{"em_T", "layer_T", "em_10T", "gap_closed"}``."""
    t = layer.n_iter
    device = next(layer.parameters()).device
    x, init = sets_with_starts(n_sets, layer.n_components, layer.n_features, n_points,
                               torch.Generator(device=device).manual_seed(EVAL_SEED), device)
    with torch.no_grad():
        trained = float((layer(x, init=init)[2] / n_points).mean())
    em_t, em_10t = -plain_em_nll(x, init, t), -plain_em_nll(x, init, 10 * t)
    gap = em_10t - em_t
    return {"em_T": em_t, "layer_T": trained, "em_10T": em_10t,
            "gap_closed": (trained - em_t) / gap if gap > 0 else float("nan")}
