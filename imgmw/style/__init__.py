"""Style transfer with Mixture-Wasserstein losses on feature mixtures (the paper's style-transfer experiment).

Gatys-style optimisation of the pixels ``x [3, H, W]`` of an image, initialised at the content image
``c``, against a style image ``s``:

    L(x) = Σ_ℓ λ_ℓ MW2²( EM_K(F_ℓ(x)), ν_ℓ )  +  β · ‖G(x) − G(c)‖² / ‖G(c)‖²,      λ_ℓ = 1 / d_ℓ²,

* ``F_ℓ(x)`` is a random subset (``n_samples`` positions, redrawn every iteration) of the ``d_ℓ``-dimensional
  feature vectors of layer ``ℓ`` of a :class:`FeatureExtractor`;
* ``EM_K`` is a ``K``-component, fixed-uniform-weight GMM obtained by **one** EM step per iteration from
  the previous iteration's detached fit (warm-started EM, the paper's Algorithm 3, via
  :class:`imgmw.MW2Loss`); the very first fit starts from ``ν_ℓ`` and runs ``n_init_iter`` EM steps on the
  content's features (a fresh k-means++ fit lands in an arbitrary local optimum of the likelihood whose
  MW2 to ``ν_ℓ`` says more about the optimum than about the image);
* ``ν_ℓ`` is a ``K``-component fixed-uniform-weight GMM fitted **once** to the style's layer-``ℓ`` features
  (:func:`fit_style_gmms`): the style is stored as ``L`` small mixtures (:class:`StyleModel`, ``.pt``);
* ``λ_ℓ = 1/d_ℓ²`` is the paper's layer weight (``MW2²`` of ``d``-dimensional features grows roughly
  like ``d`` times the per-feature scale, so deeper, wider layers would otherwise dominate);
* ``G`` is the extractor's content representation (deepest VGG layer, or the coarsest pyramid level of
  the patch extractor) and ``β`` the ``content_weight`` (the term is a relative squared error, so ``β``
  does not depend on the feature units). The paper uses no content term: the initialisation at ``c``
  keeps the content, and 100 Adam steps do not go far from it.

The pixels are optimised with Adam and clamped to ``[0, 1]`` after every step. Optionally
(``restart_every``) the warm-started fits restart from ``ν_ℓ`` every ``R`` steps: a warm-started fit
follows the image from one local optimum of the likelihood to the next and can settle in one that is far
from ``ν_ℓ`` while a fresh fit of the same image is close (the flow then stalls at the finest scale).

Feature extractors (``features=``):

* ``"vgg19"`` (the paper's): torchvision's VGG-19 ``IMAGENET1K_V1`` convolutional layers on the
  ImageNet-normalised image, activations ``relu1_1, relu2_1, relu3_1`` (``d = 64, 128, 256``, at full,
  1/2 and 1/4 resolution). The weights are read from the torch hub cache
  (``torch.hub.get_dir()/checkpoints/vgg19-dcbb9e9d.pth``) or a given file; they are downloaded only on
  request (``download=True``), never implicitly: without them :class:`WeightsUnavailableError` says how to
  get them.
* ``"patches"`` (no weights needed): ``p×p`` pixel patches (default ``p = 3``, ``d = 27``) at ``S = 3``
  levels of the image's Gaussian pyramid (full, 1/2 and 1/4 resolution) — the multi-scale patch
  statistics of texture synthesis, with the content term on the coarsest level.
* ``"auto"``: ``"vgg19"`` when its weights are available offline, else ``"patches"``.

Measurements (``data/chelsea.jpg`` at 256×170 in the style of ``data/wood.png``, patch features, K = 3,
100 steps, 2048 positions per layer; "MW2²" is :func:`style_distances`, a converged fit started from
``ν_ℓ``; patch SW2 and SSIM are :func:`imgmw.metrics.patch_sliced_w2` and ``luminance_ssim``):

* default settings: MW2² per scale 0.58, 0.44, 0.25 (content) → 0.092, 0.021, 0.012 (result); patch
  SW2 to the style 0.139 → 0.032; luminance SSIM to the content 0.57; 8–14 s on the 2-core CPU.
* ``lr``: with the very different ``data/hubble.png`` style, 0.005 moves too little in 100 steps (patch
  SW2 0.35 → 0.21, SSIM 0.40), 0.02 and 0.05 wash the content out (SSIM 0.14, 0.10); 0.01 (the paper's)
  gives SW2 0.16 with the cat still visible. Patches need no larger step than VGG features.
* ``content_weight``: with ``λ_ℓ = 1/d_ℓ²`` the style term is of order 1e-3, so ``β = 0.01`` already
  holds the coarse content (hubble, lr 0.02: content error 0.39 → 0.06, SSIM 0.14 → 0.22) and ``β = 1``
  freezes the coarsest level and its style term. The default is 0, as in the paper.
* ``restart_every = 10``: MW2² per scale 0.092, 0.021, 0.012 → 0.007, 0.002, 0.004, patch SW2
  0.032 → 0.017, SSIM 0.57 → 0.46 (more style, less content); off by default (the paper's warm start).
* VGG-19 features (timed with random weights of the same shapes, on the shared 2-core CPU): 0.9–1.6 s
  per step at 256×170 and 0.75 s at 128×85 (then the 256-dimensional EM dominates), so the paper's 100
  steps take 1–3 minutes here.
"""
from __future__ import annotations

from .features import (DEFAULT_VGG_LAYERS, FEATURES, VGG19_LAYERS, FeatureExtractor, Features, PatchFeatures,
                       VGG19Features, make_extractor)
from .model import STYLE_SAMPLES, StyleLoss, StyleModel, fit_style_gmms
from .transfer import DEFAULT_CONTENT_WEIGHT, DEFAULT_LR, StyleTransferResult, style_distances, style_transfer
from .weights import (VGG19_FILE, VGG19_URL, WeightsUnavailableError, find_vgg19_weights, load_vgg19_state,
                      vgg19_cache_path)

__all__ = [
    "FEATURES", "VGG19_FILE", "VGG19_URL", "VGG19_LAYERS", "DEFAULT_VGG_LAYERS", "WeightsUnavailableError",
    "vgg19_cache_path", "find_vgg19_weights", "load_vgg19_state", "Features", "FeatureExtractor",
    "VGG19Features", "PatchFeatures", "make_extractor", "StyleModel", "fit_style_gmms", "StyleLoss",
    "StyleTransferResult", "style_transfer", "style_distances", "STYLE_SAMPLES", "DEFAULT_LR",
    "DEFAULT_CONTENT_WEIGHT",
]
