"""A style as a few small mixtures: one fixed-uniform-weight GMM per feature layer (:class:`StyleModel`, stored as
``.pt``), fitted once to the style image's features (:func:`fit_style_gmms`), and the loss against them
(:class:`StyleLoss`)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import cast
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoint import save_atomic
from ..deprecation import renamed_parameters
from ..gmm import GMM
from ..losses import TARGET_ITER, MW2Loss, fit_target, relative_reg_covar
from ..validation import check_positive_int
from .features import FeatureExtractor, as_image_batch
from .weights import first_line

__all__ = ["STYLE_SAMPLES", "StyleModel", "fit_style_gmms", "StyleLoss"]

STYLE_SAMPLES = 8192                                 # style feature vectors per layer for the target fits
_FORMAT = "imgmw.style_model"


@dataclass
class StyleModel:
    """A style as ``L`` small mixtures: ``gmms[ℓ]`` (``K`` components in ``d_ℓ`` dimensions, unbatched)
    fitted to layer ``ℓ`` of ``extractor`` (:meth:`FeatureExtractor.config`) on the style image."""

    extractor: dict
    layers: tuple[str, ...]
    gmms: list[GMM]

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(g.n_features for g in self.gmms)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model with ``torch.save`` atomically (temporary file in the same directory, then
        ``os.replace``): the file appears whole or not at all."""
        path = Path(path)
        payload = {"format": _FORMAT, "version": 1, "extractor": dict(self.extractor), "layers": list(self.layers),
                   "gmms": [{"weights": g.weights.detach().cpu(), "means": g.means.detach().cpu(),
                             "covariances": g.covariances.detach().cpu()} for g in self.gmms]}
        return save_atomic(payload, path)

    @classmethod
    def from_patch_prior(cls, prior: GMM, patch: int) -> StyleModel:
        """The style of a patch prior (:mod:`imgmw.prior`, batch ``[S]`` over pyramid scales, ``D = 3p²``): the
        same multi-scale pixel patches as :class:`PatchFeatures` (``patch``, ``n_scales = S``; both use
        reflect-bordered Gaussian pyramids), one mixture per scale."""
        if prior.means.dim() != 3 or prior.n_features != 3 * patch * patch:
            raise ValueError(f"a patch prior is a GMM with batch [S] over {3 * patch * patch}-dimensional "
                             f"{patch}x{patch} colour patches; got means of shape {tuple(prior.means.shape)}")
        n_scales = prior.batch_shape[0]
        return cls({"features": "patches", "patch": patch, "n_scales": n_scales},
                   tuple(f"scale{s}" for s in range(n_scales)), [prior[s] for s in range(n_scales)])

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> StyleModel:
        """Read a file written by :meth:`save` (``weights_only`` loading: no code is executed)."""
        try:
            payload = torch.load(Path(path), map_location=map_location, weights_only=True)
        except Exception as err:  # noqa: BLE001 - a bad file becomes one clear message
            raise ValueError(f"{path}: cannot read a style model ({first_line(err)})") from None
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a style model written by StyleModel.save")
        gmms = [GMM(g["weights"], g["means"], g["covariances"]) for g in payload["gmms"]]
        return cls(dict(payload["extractor"]), tuple(payload["layers"]), gmms)


@torch.no_grad()
@renamed_parameters(k="n_components")
def fit_style_gmms(extractor: FeatureExtractor, style: Tensor, n_components: int = 3, *, n_samples: int = STYLE_SAMPLES,
                   n_iter: int = TARGET_ITER, generator: torch.Generator | None = None) -> StyleModel:
    """Fit the targets ``ν_ℓ``: for each layer, a ``K``-component GMM to up to ``n_samples`` feature vectors
    of ``style [3, H, W]`` (all positions if fewer) by :func:`imgmw.losses.fit_target` (at most ``n_iter``
    EM steps from k-means++, ``reg_covar = 1e-4 × λ_max`` of the features' covariance)."""
    s = as_image_batch(style, "style")[:1]
    k = check_positive_int("n_components", n_components)
    check_positive_int("n_samples", n_samples)
    extractor.check_size(s.shape[-2], s.shape[-1], what="style")
    feats = extractor(s, n_samples, generator)
    gmms = []
    for name, x in zip(extractor.layers, feats.points):
        x = x[0]
        if x.shape[0] < k:
            raise ValueError(f"the style has only {x.shape[0]} feature vectors at layer {name}, fewer than "
                             f"n_components={k}")
        gmms.append(fit_target(x, k, n_iter=n_iter, generator=generator))
    return StyleModel(extractor.config(), extractor.layers, gmms)


class StyleLoss(nn.Module):
    """Per-layer ``MW2²(EM_K(F_ℓ(x)), ν_ℓ)`` with warm-started EM (one step per call), one
    :class:`imgmw.MW2Loss` per layer; ``reg_covar`` of the input fits is ``1e-4 × λ_max`` of ``ν_ℓ``.

    ``forward(points)`` takes the per-layer points ``[B, n_ℓ, d_ℓ]`` and returns the unweighted terms
    ``[L]`` (each the mean over the batch); :attr:`weights` holds ``λ_ℓ = 1/d_ℓ²``. The first call of each
    layer starts its fit from ``ν_ℓ`` (broadcast to the batch) and runs ``n_init_iter`` EM steps.
    """

    weights: Tensor   # buffer: λ_ℓ = 1/d_ℓ² [L]

    def __init__(self, model: StyleModel, *, n_init_iter: int = 30, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.terms = nn.ModuleList(
            MW2Loss(g, warm_start=True, reg_covar=relative_reg_covar(g),
                    n_iter=check_positive_int("n_init_iter", n_init_iter), generator=generator) for g in model.gmms)
        self.register_buffer("weights", torch.tensor([1.0 / d ** 2 for d in model.dims]))

    def _losses(self) -> list[MW2Loss]:
        return [cast(MW2Loss, term) for term in self.terms]

    def reset(self) -> None:
        """Forget the warm-started fits: the next call restarts every layer's fit from ``ν_ℓ``."""
        for term in self._losses():
            term.reset()

    def forward(self, points: list[Tensor]) -> Tensor:
        if len(points) != len(self.terms):
            raise ValueError(f"expected features of {len(self.terms)} layers, got {len(points)}")
        values = []
        for term, x in zip(self._losses(), points):
            term.start_from_target(x.shape[:-2])
            values.append(term(x))
        return torch.stack(values)
