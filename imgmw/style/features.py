"""Feature extractors of style transfer: VGG-19 activations (offline weights only) or multi-scale pixel patches.

Both map an image ``[1, 3, H, W]`` to one ``[N_ℓ, d_ℓ]`` point set per layer ``ℓ`` (optionally a random
subset of ``n_samples`` positions) and give a content representation (see :mod:`imgmw.style`).
"""
from __future__ import annotations

import abc
import math
import os
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from ..patches import gather_patches, gaussian_pyramid, patch_grid
from ..validation import check_choice, check_positive_int
from .weights import WeightsUnavailableError, find_vgg19_weights, load_vgg19_state

__all__ = ["FEATURES", "VGG19_LAYERS", "DEFAULT_VGG_LAYERS", "Features", "FeatureExtractor", "VGG19Features",
           "PatchFeatures", "make_extractor", "as_image_batch"]

FEATURES = ("auto", "vgg19", "patches")
# Index of each ReLU in torchvision's ``vgg19().features`` (convolutions at index − 1, max-pools at 4, 9, 18, 27).
VGG19_LAYERS = {"relu1_1": 1, "relu1_2": 3, "relu2_1": 6, "relu2_2": 8, "relu3_1": 11, "relu3_2": 13,
                "relu3_3": 15, "relu3_4": 17, "relu4_1": 20, "relu4_2": 22, "relu4_3": 24, "relu4_4": 26,
                "relu5_1": 29, "relu5_2": 31, "relu5_3": 33, "relu5_4": 35}
DEFAULT_VGG_LAYERS = ("relu1_1", "relu2_1", "relu3_1")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def as_image_batch(img: Tensor, name: str) -> Tensor:
    """``[3, H, W]`` or ``[B, 3, H, W]`` finite float image → ``[B, 3, H, W]``."""
    if not isinstance(img, Tensor) or img.dim() not in (3, 4) or img.shape[-3] != 3:
        shape = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
        raise ValueError(f"{name} must be an RGB image tensor [3, H, W] or [B, 3, H, W], got {shape}")
    if not img.is_floating_point() or not bool(torch.isfinite(img).all()):
        raise ValueError(f"{name} must be a finite float tensor, got dtype {img.dtype}")
    return img if img.dim() == 4 else img.unsqueeze(0)


def _draw_positions(total: int, n: int | None, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``min(n, total)`` distinct positions in ``[0, total)`` (all of them, in order, when ``n`` is None or
    ``n >= total``), drawn on the generator's device and moved to ``device``."""
    if n is None or n >= total:
        return torch.arange(total, device=device)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randperm(total, generator=generator, device=gen_device)[:n].to(device)


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

    mean: Tensor   # buffers: ImageNet normalisation [1, 3, 1, 1]
    std: Tensor

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
        content_layer = max(layers, key=VGG19_LAYERS.__getitem__) if content_layer is None else content_layer
        check_choice("content_layer", content_layer, layers)
        self.layers = tuple(sorted(layers, key=VGG19_LAYERS.__getitem__))
        self.content_layer = content_layer
        self.indices = tuple(VGG19_LAYERS[name] for name in self.layers)
        self.net = _vgg19_trunk(state, self.indices[-1] + 1)
        self.dims = tuple(cast(nn.Conv2d, self.net[i - 1]).out_channels for i in self.indices)
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
        self.patch = check_positive_int("patch", patch)
        self.n_scales = check_positive_int("n_scales", n_scales)
        self.layers = tuple(f"scale{s}" for s in range(n_scales))
        self.dims = (3 * patch * patch,) * n_scales

    def forward(self, image: Tensor, n_samples: int | None = None,
                generator: torch.Generator | None = None) -> Features:
        self.check_size(*image.shape[-2:])
        levels = gaussian_pyramid(image, self.n_scales)
        points = []
        for level in levels:
            total = math.prod(patch_grid(level.shape[-2], level.shape[-1], self.patch))
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
