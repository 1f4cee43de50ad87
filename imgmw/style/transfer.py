"""The style-transfer optimisation (Adam on the pixels against :class:`~imgmw.style.model.StyleLoss` plus an
optional content term) and its evaluation by converged fits (:func:`style_distances`); see :mod:`imgmw.style`."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from collections.abc import Callable

import torch
from torch import Tensor

from ..em import fit_gmm
from ..deprecation import renamed_parameters
from ..flow import refit_mw2, run_flow
from ..losses import TARGET_TOL, relative_reg_covar
from ..ot import mw2
from ..validation import check_positive_int
from .features import FeatureExtractor, as_image_batch, make_extractor
from .model import STYLE_SAMPLES, StyleLoss, StyleModel, fit_style_gmms

__all__ = ["DEFAULT_LR", "DEFAULT_CONTENT_WEIGHT", "StyleTransferResult", "style_transfer", "style_distances"]

DEFAULT_LR = 0.01                                    # Adam step on the pixels (the paper's; see imgmw.style)
DEFAULT_CONTENT_WEIGHT = 0.0                         # the paper's: no content term (init at the content)


@dataclass
class StyleTransferResult:
    """Output of :func:`style_transfer`.

    Attributes:
        image: ``[3, H, W]`` result in [0, 1].
        style_losses: ``[T, L]`` unweighted per-layer ``MW2²`` at every step (before that step's update;
            each from that step's random positions and warm-started fit).
        content_losses: ``[T]`` relative content error at every step.
        losses: ``[T]`` total objective ``Σ λ_ℓ MW2²_ℓ + β · content``.
        model: the style mixtures (:class:`StyleModel`).
        extractor: the feature extractor used.
        lr, content_weight: the values used.
        seconds: wall time of the optimisation loop; setup_seconds: of the target fits.
    """

    image: Tensor
    style_losses: Tensor
    content_losses: Tensor
    losses: Tensor
    model: StyleModel
    extractor: FeatureExtractor
    lr: float
    content_weight: float
    seconds: float = 0.0
    setup_seconds: float = 0.0
    layer_weights: list[float] = field(default_factory=list)


def _content_error(current: Tensor, reference: Tensor) -> Tensor:
    """``‖G(x) − G(c)‖² / ‖G(c)‖²`` (mean over the batch), with ``‖G(c)‖²`` floored at the dtype's tiny."""
    dims = tuple(range(1, current.dim()))
    num = (current - reference).square().sum(dims)
    den = reference.square().sum(dims).clamp_min(torch.finfo(reference.dtype).tiny)
    return (num / den).mean()


def _check_model(model: StyleModel, extractor: FeatureExtractor, k: int) -> None:
    if tuple(model.layers) != tuple(extractor.layers) or model.dims != tuple(extractor.dims):
        raise ValueError(f"style model layers {model.layers} (dims {model.dims}) do not match the extractor's "
                         f"{extractor.layers} (dims {extractor.dims}); build the extractor with "
                         f"make_extractor(**model.extractor)")
    if any(g.n_components != k for g in model.gmms):
        raise ValueError(f"style model has {[g.n_components for g in model.gmms]} components per layer, "
                         f"n_components={k}")


@renamed_parameters(k="n_components", iters="n_iter")
def style_transfer(content: Tensor, style: Tensor | StyleModel, *, features: str | FeatureExtractor = "auto",
                   n_components: int = 3, n_iter: int = 100, lr: float | None = None,
                   content_weight: float | None = None,
                   n_samples: int = 2048, restart_every: int = 0, weights: str | os.PathLike | None = None,
                   download: bool = False,
                   generator: torch.Generator | None = None,
                   callback: Callable[[int, Tensor, Tensor], None] | None = None) -> StyleTransferResult:
    """Give ``content [3, H, W]`` the style of ``style [3, H', W']`` (or of a stored :class:`StyleModel`).

    Minimises ``Σ_ℓ λ_ℓ MW2²(EM_K(F_ℓ(x)), ν_ℓ) + β ‖G(x) − G(c)‖²/‖G(c)‖²`` over the pixels ``x`` (see
    the module doc) with Adam, starting at ``x = content`` and clamping to [0, 1] after each step.

    Args:
        features: ``"auto"``, ``"vgg19"``, ``"patches"`` (:func:`make_extractor` with ``weights`` and
            ``download``) or a :class:`FeatureExtractor`.
        n_components: mixture components per layer on both sides.
        n_iter: Adam steps.
        lr: Adam step size on the pixels, default 0.01 (the paper's, also best for patches; module doc).
        content_weight: ``β >= 0``, default 0 (the paper's; the initialisation keeps the content).
        n_samples: feature positions per layer per step for the EM fits (all when a layer has fewer).
        restart_every: every ``R`` steps restart the warm-started fits from ``ν_ℓ`` (``n_init_iter`` EM
            steps on the current image); 0 (default) never restarts, as the paper's Algorithm 3.
        generator: ``torch.Generator`` for the target fits, the position draws and the k-means++ starts.
        callback: ``callback(step, style_terms [L], image [1, 3, H, W])`` after each step (the flows' one
            signature: step, loss, state); ``style_terms`` stays on the device (read it at
            :func:`imgmw.flow.run_flow`'s sync points: ``(step + 1) % imgmw.flow.SYNC_EVERY == 0``).
    """
    c = as_image_batch(content, "content").detach()
    if c.shape[0] != 1:
        raise ValueError(f"content must be a single image [3, H, W], got {tuple(content.shape)}")
    k = check_positive_int("n_components", n_components)
    check_positive_int("n_iter", n_iter)
    check_positive_int("n_samples", n_samples)
    if isinstance(restart_every, bool) or not isinstance(restart_every, int) or restart_every < 0:
        raise ValueError(f"restart_every must be an integer >= 0, got {restart_every!r}")
    extractor = features if isinstance(features, FeatureExtractor) else make_extractor(
        features, weights=weights, download=download)
    extractor = extractor.to(device=c.device, dtype=c.dtype)
    lr = DEFAULT_LR if lr is None else lr
    beta = DEFAULT_CONTENT_WEIGHT if content_weight is None else content_weight
    if not (isinstance(lr, (int, float)) and 0 < lr < math.inf):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not (isinstance(beta, (int, float)) and 0 <= beta < math.inf):
        raise ValueError(f"content_weight must be a finite number >= 0, got {content_weight!r}")
    extractor.check_size(c.shape[-2], c.shape[-1], what="content")

    start = time.perf_counter()
    if isinstance(style, StyleModel):
        model = StyleModel(style.extractor, style.layers, [g.to(device=c.device, dtype=c.dtype) for g in style.gmms])
        _check_model(model, extractor, k)
    else:
        model = fit_style_gmms(extractor, as_image_batch(style, "style").to(c), k, generator=generator)
    loss_fn = StyleLoss(model, generator=generator).to(device=c.device, dtype=c.dtype)
    with torch.no_grad():
        reference = extractor(c).content
    setup = time.perf_counter() - start

    n_layers = len(model.gmms)
    last: list[Tensor] = []
    content_errors: list[Tensor] = []

    def objective(x: Tensor, step: int) -> Tensor:
        """``[L + 1]``: the weighted style terms ``λ_ℓ MW2²_ℓ`` and the weighted content term."""
        if restart_every and step and step % restart_every == 0:
            loss_fn.reset()
        feats = extractor(x, n_samples, generator)
        content_error = _content_error(feats.content, reference)
        out = torch.cat([loss_fn.weights * loss_fn(feats.points), beta * content_error[None]])
        last[:] = [out.detach()]
        content_errors.append(content_error.detach())
        return out

    hook = None if callback is None else (lambda step, _, x: callback(step, last[0][:n_layers] / loss_fn.weights, x))
    flow = run_flow(c, objective, n_iter=n_iter, lr=float(lr), step="adam", project=lambda x: x.clamp_(0.0, 1.0),
                    callback=hook)
    assert flow.terms is not None  # n_iter >= 1
    terms = flow.terms.to("cpu", torch.float64)
    style_hist = terms[:, :n_layers] / loss_fn.weights.to("cpu", torch.float64)
    content_hist = torch.stack(content_errors).to("cpu", torch.float64)
    total_hist = terms.sum(1)
    x, seconds = flow.x, flow.seconds
    return StyleTransferResult(x.detach()[0], style_hist, content_hist, total_hist, model, extractor, float(lr),
                               float(beta), seconds, setup, loss_fn.weights.tolist())


@torch.no_grad()
def style_distances(image: Tensor, model: StyleModel, extractor: FeatureExtractor, *,
                    n_samples: int = STYLE_SAMPLES, n_iter: int = 100, seed: int = 0,
                    fresh: bool = False) -> list[float]:
    """Per-layer ``MW2²(EM_K(F_ℓ(image)), ν_ℓ)`` of a converged fit — an evaluation, not the training loss.

    The fit uses up to ``n_samples`` positions per layer (drawn with a CPU generator seeded with ``seed``: an
    evaluation, the same every time, as :mod:`imgmw.metrics`)
    and at most ``n_iter`` EM steps (tolerance 1e-5, ``reg_covar = 1e-4 × λ_max(ν_ℓ)``), started from
    ``ν_ℓ`` so that two images are compared through the same local optimum family as in
    :class:`StyleLoss`; ``fresh=True`` starts from k-means++ instead (best of three,
    :func:`imgmw.flow.refit_mw2`): the refit diagnostic of the loss.
    """
    x = as_image_batch(image, "image")[:1]
    extractor.check_size(*x.shape[-2:])
    generator = torch.Generator().manual_seed(seed)
    feats = extractor(x, n_samples, generator)
    out = []
    for target, pts in zip(model.gmms, feats.points):
        target = target.to(device=pts.device, dtype=pts.dtype)
        reg = relative_reg_covar(target)
        if fresh:
            out.append(float(refit_mw2(pts[0], target, reg_covar=reg, n_iter=n_iter, generator=generator)))
            continue
        fit = fit_gmm(pts[0], target.n_components, n_iter=n_iter, tol=TARGET_TOL, init=target,
                      reg_covar=reg, grad="none").gmm
        out.append(float(mw2(fit, target)))
    return out
