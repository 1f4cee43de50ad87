"""imgmw: differentiable Gaussian-mixture optimal transport on images.

Batched, differentiable EM for Gaussian mixtures (:func:`fit_gmm`, :func:`em_step`,
:class:`WarmStartEM`, :class:`GaussianMixture`), Mixture-Wasserstein distances and losses between
mixtures (:func:`mw2`, :class:`MW2Loss`), GMM optimal-transport maps and barycentres, image and patch
plumbing, and EM as a neural-operator layer (:class:`EMLayer`).

Public names are resolved lazily, so ``import imgmw`` stays cheap until a name is used.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "GMM": "gmm",
    "EMResult": "em", "e_step": "em", "em_step": "em", "fit_gmm": "em", "m_step": "mstep", "em_map": "mstep",
    "WarmStartEM": "warm", "FitPolicy": "warm",
    "run_flow": "flow", "refit_mw2": "flow", "FlowDivergence": "flow",
    "GaussianMixture": "estimator",
    "mw2": "ot", "gaussian_w2_cost": "ot", "gmm_ot_plan": "ot", "gmm_ot_map": "ot", "gmm_barycentre": "ot",
    "MW2Loss": "losses", "fit_target": "losses", "PatchMW2Loss": "texture",
    "EMLayer": "layers",
    "load_image": "image", "save_image": "image",
    "transfer_colours": "colour", "style_transfer": "style", "StyleModel": "style",
    "barycentre_flow": "barycentre", "MW2GeneratorTrainer": "generative",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'imgmw' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
