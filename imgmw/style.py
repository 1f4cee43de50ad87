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

import abc
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from .checkpoint import save_atomic
from .em import fit_gmm
from .flow import refit_mw2, run_flow
from .gmm import GMM
from .losses import TARGET_ITER, TARGET_TOL, MW2Loss, fit_target, relative_reg_covar
from .ot import mw2
from .patches import gather_patches, gaussian_pyramid, patch_grid
from .validation import check_choice

__all__ = [
    "FEATURES", "VGG19_FILE", "VGG19_URL", "VGG19_LAYERS", "DEFAULT_VGG_LAYERS", "WeightsUnavailableError",
    "vgg19_cache_path", "find_vgg19_weights", "load_vgg19_state", "Features", "FeatureExtractor",
    "VGG19Features", "PatchFeatures", "make_extractor", "StyleModel", "fit_style_gmms", "StyleLoss",
    "StyleTransferResult", "style_transfer", "style_distances",
]

FEATURES = ("auto", "vgg19", "patches")
VGG19_FILE = "vgg19-dcbb9e9d.pth"  # the file name torchvision's VGG19_Weights.IMAGENET1K_V1 is cached under
VGG19_URL = "https://download.pytorch.org/models/" + VGG19_FILE
# Index of each ReLU in torchvision's ``vgg19().features`` (convolutions at index − 1, max-pools at 4, 9, 18, 27).
VGG19_LAYERS = {"relu1_1": 1, "relu1_2": 3, "relu2_1": 6, "relu2_2": 8, "relu3_1": 11, "relu3_2": 13,
                "relu3_3": 15, "relu3_4": 17, "relu4_1": 20, "relu4_2": 22, "relu4_3": 24, "relu4_4": 26,
                "relu5_1": 29, "relu5_2": 31, "relu5_3": 33, "relu5_4": 35}
DEFAULT_VGG_LAYERS = ("relu1_1", "relu2_1", "relu3_1")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_LR = 0.01                                    # Adam step on the pixels (the paper's; see the module doc)
DEFAULT_CONTENT_WEIGHT = 0.0                         # the paper's: no content term (init at the content)
STYLE_SAMPLES = 8192                                 # style feature vectors per layer for the target fits
_FORMAT = "imgmw.style_model"


class WeightsUnavailableError(ValueError):
    """VGG-19 weights were asked for but are not on this machine (and downloading was not allowed)."""


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _as_batch(img: Tensor, name: str) -> Tensor:
    """``[3, H, W]`` or ``[B, 3, H, W]`` finite float image → ``[B, 3, H, W]``."""
    if not isinstance(img, Tensor) or img.dim() not in (3, 4) or img.shape[-3] != 3:
        shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
        raise ValueError(f"{name} must be an RGB image tensor [3, H, W] or [B, 3, H, W], got {shape}")
    if not img.is_floating_point() or not bool(torch.isfinite(img).all()):
        raise ValueError(f"{name} must be a finite float tensor, got dtype {img.dtype}")
    return img if img.dim() == 4 else img.unsqueeze(0)


def _first_line(err: BaseException) -> str:
    """``"ErrorType: first line of the message"`` (torch.load errors run over many lines)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _draw_positions(total: int, n: int | None, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``min(n, total)`` distinct positions in ``[0, total)`` (all of them, in order, when ``n`` is None or
    ``n >= total``), drawn on the generator's device and moved to ``device``."""
    if n is None or n >= total:
        return torch.arange(total, device=device)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randperm(total, generator=generator, device=gen_device)[:n].to(device)


# --------------------------------------------------------------------------------------- VGG-19 weights

def vgg19_cache_path() -> Path:
    """Where torchvision caches the VGG-19 ImageNet weights: ``torch.hub.get_dir()/checkpoints/vgg19-dcbb9e9d.pth``
    (``$TORCH_HOME/hub/...``, default ``~/.cache/torch/hub/...``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG19_FILE


def find_vgg19_weights(weights: str | os.PathLike | None = None) -> Path | None:
    """The weights file to use: ``weights`` if given (it must exist), else the hub cache file if present,
    else ``None``. Never touches the network."""
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise WeightsUnavailableError(f"VGG-19 weights file {path} does not exist or is not a file")
        return path
    cached = vgg19_cache_path()
    return cached if cached.is_file() else None


def _unavailable_message() -> str:
    return (f"VGG-19 weights are not available offline: {vgg19_cache_path()} does not exist. Get them once "
            f"with --download (fetches 548 MB from {VGG19_URL} into that cache; download=True in Python), "
            f"copy that file there or pass it with --weights PATH; or use --features patches, which needs "
            f"no weights")


def load_vgg19_state(weights: str | os.PathLike | None = None, *, download: bool = False) -> dict[str, Tensor]:
    """The ``features.*`` tensors of torchvision's VGG-19 ``IMAGENET1K_V1`` state dict.

    Looks at ``weights`` or the hub cache (:func:`find_vgg19_weights`); only when neither has the file and
    ``download`` is true does it fetch the file into the cache with ``torch.hub.load_state_dict_from_url``
    (hash-checked). Raises :class:`WeightsUnavailableError` otherwise, without any network access.
    """
    path = find_vgg19_weights(weights)
    if path is None:
        if not download:
            raise WeightsUnavailableError(_unavailable_message())
        state = torch.hub.load_state_dict_from_url(VGG19_URL, map_location="cpu", progress=True, check_hash=True)
    else:
        state = _load_checkpoint(path)
    features = {k: v for k, v in state.items() if isinstance(k, str) and k.startswith("features.")}
    if not features:
        raise WeightsUnavailableError(f"{path}: not a VGG-19 state dict (no 'features.*' entries)")
    return features


def _load_checkpoint(path: Path) -> dict:
    """``torch.load`` of a state dict (tensors only), memory-mapped when the file format allows it."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) checkpoints cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file becomes one clear message
        raise WeightsUnavailableError(f"{path}: cannot read VGG-19 weights ({_first_line(err)})") from None
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"{path}: not a state dict (got {type(state).__name__})")
    return state


# ------------------------------------------------------------------------------------- feature extractors

@dataclass
class Features:
    """What a :class:`FeatureExtractor` gives for an image batch.

    Attributes:
        points: per layer ``ℓ``, feature vectors ``[B, n_ℓ, d_ℓ]`` at ``n_ℓ`` positions (the same positions
            for every batch element).
        content: the content representation ``[B, ...]`` (a full feature map), compared between images of
            the same size by the content term.
    """

    points: list[Tensor]
    content: Tensor


class FeatureExtractor(nn.Module, abc.ABC):
    """Maps images ``[B, 3, H, W]`` (sRGB in [0, 1]) to per-layer feature vectors; no trainable state.

    Subclasses set ``name``, ``layers`` (names) and ``dims`` (``d_ℓ``) and implement :meth:`forward`,
    :meth:`check_size` and :meth:`config` (keyword arguments of :func:`make_extractor` that rebuild it).
    """

    name: str
    layers: tuple[str, ...]
    dims: tuple[int, ...]

    @abc.abstractmethod
    def forward(self, image: Tensor, n_samples: int | None = None,
                generator: torch.Generator | None = None) -> Features:
        """Features of ``image [B, 3, H, W]``: ``n_samples`` random positions per layer (all if ``None``)."""

    @abc.abstractmethod
    def check_size(self, height: int, width: int, what: str = "image") -> None:
        """Raise ValueError when an ``H × W`` image is too small for this extractor."""

    @abc.abstractmethod
    def config(self) -> dict:
        """The keyword arguments of :func:`make_extractor` that rebuild this extractor."""


class VGG19Features(FeatureExtractor):
    """VGG-19 activations (torchvision's ``vgg19().features``, frozen, in eval mode) at named ReLU layers.

    The image is normalised with the ImageNet mean and standard deviation, then run through the
    convolutional layers up to the deepest requested one. Layer ``reluB_N`` has ``d = 64·2^(B−1)`` channels
    (512 from block 4) at ``1/2^(B−1)`` of the input resolution. The content representation is the whole
    map of ``content_layer`` (default: the deepest requested layer).

    Args:
        state: the ``features.*`` tensors of a VGG-19 state dict (:func:`load_vgg19_state`); entries beyond
            the deepest layer are ignored.
        layers: ReLU names from :data:`VGG19_LAYERS`, default ``relu1_1, relu2_1, relu3_1``.
        content_layer: one of ``layers`` (default the deepest).
    """

    name = "vgg19"

    def __init__(self, state: dict[str, Tensor], layers: tuple[str, ...] = DEFAULT_VGG_LAYERS,
                 content_layer: str | None = None) -> None:
        super().__init__()
        layers = tuple(layers)
        if not layers:
            raise ValueError("layers must name at least one VGG-19 layer")
        for layer in layers:
            check_choice("layers", layer, tuple(VGG19_LAYERS))
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers must be distinct, got {layers}")
        content_layer = max(layers, key=VGG19_LAYERS.get) if content_layer is None else content_layer
        check_choice("content_layer", content_layer, layers)
        self.layers = tuple(sorted(layers, key=VGG19_LAYERS.get))
        self.content_layer = content_layer
        self.indices = tuple(VGG19_LAYERS[name] for name in self.layers)
        self.net = _vgg19_trunk(state, self.indices[-1] + 1)
        self.dims = tuple(self.net[i - 1].out_channels for i in self.indices)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def maps(self, image: Tensor) -> list[Tensor]:
        """Activation maps ``[B, d_ℓ, H_ℓ, W_ℓ]`` of the requested layers for ``image [B, 3, H, W]``."""
        h = (image - self.mean) / self.std
        out = []
        for i, module in enumerate(self.net):
            h = module(h)
            if i in self.indices:
                out.append(h)
        return out

    def forward(self, image: Tensor, n_samples: int | None = None,
                generator: torch.Generator | None = None) -> Features:
        maps = self.maps(image)
        points = []
        for fmap in maps:
            flat = fmap.flatten(2)                                                # [B, d, h·w]
            pos = _draw_positions(flat.shape[-1], n_samples, generator, flat.device)
            points.append(flat.index_select(2, pos).transpose(1, 2))              # [B, n, d]
        return Features(points, maps[self.layers.index(self.content_layer)])

    def check_size(self, height: int, width: int, what: str = "image") -> None:
        pools = sum(1 for m in self.net if isinstance(m, nn.MaxPool2d))
        need = 2 ** pools * 2
        if min(height, width) < need:
            raise ValueError(f"{what} of size {height}x{width} is too small for VGG-19 layer {self.layers[-1]} "
                             f"(sides >= {need} needed); use a larger image")

    def config(self) -> dict:
        return {"features": "vgg19", "layers": list(self.layers), "content_layer": self.content_layer}


def _vgg19_trunk(state: dict[str, Tensor], n_modules: int) -> nn.Sequential:
    """The first ``n_modules`` modules of torchvision's ``vgg19().features`` holding ``state``'s tensors.

    The network is built on the ``meta`` device (no random initialisation of the 140 M parameters) and
    the needed tensors are assigned from ``state``; a missing or mis-shaped entry raises
    :class:`WeightsUnavailableError`.
    """
    from torchvision.models import vgg19

    with torch.device("meta"):
        trunk = vgg19(weights=None).features[:n_modules]
    wanted = trunk.state_dict()
    sub = {}
    for key, meta in wanted.items():
        value = state.get(f"features.{key}")
        if value is None or tuple(value.shape) != tuple(meta.shape):
            found = None if value is None else tuple(value.shape)
            raise WeightsUnavailableError(f"VGG-19 weights lack features.{key} of shape {tuple(meta.shape)} "
                                          f"(found {found}); the file is not torchvision's VGG-19")
        sub[key] = value.detach().to(torch.float32).clone()
    trunk.load_state_dict(sub, assign=True)
    for module in trunk:
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return trunk.eval().requires_grad_(False)


class PatchFeatures(FeatureExtractor):
    """Multi-scale pixel patches: ``p×p`` patches (``d = 3p²``, channel-major as in
    :func:`imgmw.patches.extract_patches`) of each level of the image's Gaussian pyramid
    (:func:`imgmw.patches.gaussian_pyramid`, reflect borders), levels ``scale0`` (full resolution) to
    ``scale{S−1}`` (sides divided by ``2^(S−1)``). The content representation is the coarsest level
    ``[B, 3, H/2^(S−1), W/2^(S−1)]``.
    """

    name = "patches"

    def __init__(self, patch: int = 3, n_scales: int = 3) -> None:
        super().__init__()
        self.patch = _positive_int("patch", patch)
        self.n_scales = _positive_int("n_scales", n_scales)
        self.layers = tuple(f"scale{s}" for s in range(n_scales))
        self.dims = (3 * patch * patch,) * n_scales

    def forward(self, image: Tensor, n_samples: int | None = None,
                generator: torch.Generator | None = None) -> Features:
        self.check_size(*image.shape[-2:])
        levels = gaussian_pyramid(image, self.n_scales)
        points = []
        for level in levels:
            total = math.prod(patch_grid(*level.shape[-2:], self.patch))
            pos = _draw_positions(total, n_samples, generator, level.device)
            points.append(gather_patches(level, self.patch, pos))
        return Features(points, levels[-1])

    def check_size(self, height: int, width: int, what: str = "image") -> None:
        need = max(self.patch, 3) << (self.n_scales - 1)
        if min(height, width) < need:
            raise ValueError(f"{what} of size {height}x{width} is too small for {self.n_scales} pyramid levels of "
                             f"{self.patch}x{self.patch} patches (sides >= {need} needed); use a larger image, "
                             f"fewer scales or a smaller patch")

    def config(self) -> dict:
        return {"features": "patches", "patch": self.patch, "n_scales": self.n_scales}


def make_extractor(features: str = "auto", *, weights: str | os.PathLike | None = None, download: bool = False,
                   layers: tuple[str, ...] | list[str] = DEFAULT_VGG_LAYERS, content_layer: str | None = None,
                   patch: int = 3, n_scales: int = 3) -> FeatureExtractor:
    """Build a feature extractor: ``"vgg19"`` (weights from ``weights``, the hub cache, or a download when
    ``download`` is true), ``"patches"`` (``patch``, ``n_scales``), or ``"auto"`` (``"vgg19"`` when its
    weights are available without the network or ``weights`` is given, else ``"patches"``)."""
    check_choice("features", features, FEATURES)
    if features == "auto":
        features = "vgg19" if (weights is not None or find_vgg19_weights() is not None) else "patches"
    if features == "vgg19":
        return VGG19Features(load_vgg19_state(weights, download=download), tuple(layers), content_layer)
    return PatchFeatures(patch, n_scales)


# ----------------------------------------------------------------------------------------- style mixtures

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
            raise ValueError(f"{path}: cannot read a style model ({_first_line(err)})") from None
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a style model written by StyleModel.save")
        gmms = [GMM(g["weights"], g["means"], g["covariances"]) for g in payload["gmms"]]
        return cls(dict(payload["extractor"]), tuple(payload["layers"]), gmms)


@torch.no_grad()
def fit_style_gmms(extractor: FeatureExtractor, style: Tensor, k: int = 3, *, n_samples: int = STYLE_SAMPLES,
                   n_iter: int = TARGET_ITER, generator: torch.Generator | None = None) -> StyleModel:
    """Fit the targets ``ν_ℓ``: for each layer, a ``K``-component GMM to up to ``n_samples`` feature vectors
    of ``style [3, H, W]`` (all positions if fewer) by :func:`imgmw.losses.fit_target` (at most ``n_iter``
    EM steps from k-means++, ``reg_covar = 1e-4 × λ_max`` of the features' covariance)."""
    s = _as_batch(style, "style")[:1]
    _positive_int("k", k)
    _positive_int("n_samples", n_samples)
    extractor.check_size(*s.shape[-2:], what="style")
    feats = extractor(s, n_samples, generator)
    gmms = []
    for name, x in zip(extractor.layers, feats.points):
        x = x[0]
        if x.shape[0] < k:
            raise ValueError(f"the style has only {x.shape[0]} feature vectors at layer {name}, fewer than k={k}")
        gmms.append(fit_target(x, k, n_iter=n_iter, generator=generator))
    return StyleModel(extractor.config(), extractor.layers, gmms)


class StyleLoss(nn.Module):
    """Per-layer ``MW2²(EM_K(F_ℓ(x)), ν_ℓ)`` with warm-started EM (one step per call), one
    :class:`imgmw.MW2Loss` per layer; ``reg_covar`` of the input fits is ``1e-4 × λ_max`` of ``ν_ℓ``.

    ``forward(points)`` takes the per-layer points ``[B, n_ℓ, d_ℓ]`` and returns the unweighted terms
    ``[L]`` (each the mean over the batch); :attr:`weights` holds ``λ_ℓ = 1/d_ℓ²``. The first call of each
    layer starts its fit from ``ν_ℓ`` (broadcast to the batch) and runs ``n_init_iter`` EM steps.
    """

    def __init__(self, model: StyleModel, *, n_init_iter: int = 30, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.terms = nn.ModuleList(
            MW2Loss(g, warm_start=True, reg_covar=relative_reg_covar(g),
                    n_iter=_positive_int("n_init_iter", n_init_iter), generator=generator) for g in model.gmms)
        self.register_buffer("weights", torch.tensor([1.0 / d ** 2 for d in model.dims]))

    def reset(self) -> None:
        """Forget the warm-started fits: the next call restarts every layer's fit from ``ν_ℓ``."""
        for term in self.terms:
            term.reset()

    def forward(self, points: list[Tensor]) -> Tensor:
        if len(points) != len(self.terms):
            raise ValueError(f"expected features of {len(self.terms)} layers, got {len(points)}")
        values = []
        for term, x in zip(self.terms, points):
            term.start_from_target(x.shape[:-2])
            values.append(term(x))
        return torch.stack(values)


# ------------------------------------------------------------------------------------------ optimisation

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
        raise ValueError(f"style model has {[g.n_components for g in model.gmms]} components per layer, k={k}")


def style_transfer(content: Tensor, style: Tensor | StyleModel, *, features: str | FeatureExtractor = "auto",
                   k: int = 3, iters: int = 100, lr: float | None = None, content_weight: float | None = None,
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
        k: mixture components per layer on both sides.
        iters: Adam steps.
        lr: Adam step size on the pixels, default 0.01 (the paper's, also best for patches; module doc).
        content_weight: ``β >= 0``, default 0 (the paper's; the initialisation keeps the content).
        n_samples: feature positions per layer per step for the EM fits (all when a layer has fewer).
        restart_every: every ``R`` steps restart the warm-started fits from ``ν_ℓ`` (``n_init_iter`` EM
            steps on the current image); 0 (default) never restarts, as the paper's Algorithm 3.
        generator: ``torch.Generator`` for the target fits, the position draws and the k-means++ starts.
        callback: ``callback(step, image [1, 3, H, W], style_terms [L])`` after each step; ``style_terms`` stays
            on the device (read it at :func:`imgmw.flow.run_flow`'s sync points:
            ``(step + 1) % imgmw.flow.SYNC_EVERY == 0``).
    """
    c = _as_batch(content, "content").detach()
    if c.shape[0] != 1:
        raise ValueError(f"content must be a single image [3, H, W], got {tuple(content.shape)}")
    _positive_int("k", k)
    _positive_int("iters", iters)
    _positive_int("n_samples", n_samples)
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
    extractor.check_size(*c.shape[-2:], what="content")

    start = time.perf_counter()
    if isinstance(style, StyleModel):
        model = StyleModel(style.extractor, style.layers, [g.to(device=c.device, dtype=c.dtype) for g in style.gmms])
        _check_model(model, extractor, k)
    else:
        model = fit_style_gmms(extractor, _as_batch(style, "style").to(c), k, generator=generator)
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

    hook = None if callback is None else (lambda step, _, x: callback(step, x, last[0][:n_layers] / loss_fn.weights))
    flow = run_flow(c, objective, iters=iters, lr=float(lr), step="adam", project=lambda x: x.clamp_(0.0, 1.0),
                    callback=hook)
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

    The fit uses up to ``n_samples`` positions per layer (drawn with a CPU generator seeded with ``seed``)
    and at most ``n_iter`` EM steps (tolerance 1e-5, ``reg_covar = 1e-4 × λ_max(ν_ℓ)``), started from
    ``ν_ℓ`` so that two images are compared through the same local optimum family as in
    :class:`StyleLoss`; ``fresh=True`` starts from k-means++ instead (best of three,
    :func:`imgmw.flow.refit_mw2`): the refit diagnostic of the loss.
    """
    x = _as_batch(image, "image")[:1]
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
