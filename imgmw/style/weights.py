"""VGG-19 weights for the style features: found in the torch hub cache or a given file, downloaded only on request."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["VGG19_FILE", "VGG19_URL", "WeightsUnavailableError", "vgg19_cache_path", "find_vgg19_weights",
           "load_vgg19_state", "first_line"]

VGG19_FILE = "vgg19-dcbb9e9d.pth"  # the file name torchvision's VGG19_Weights.IMAGENET1K_V1 is cached under
VGG19_URL = "https://download.pytorch.org/models/" + VGG19_FILE


class WeightsUnavailableError(ValueError):
    """VGG-19 weights were asked for but are not on this machine (and downloading was not allowed)."""


def first_line(err: BaseException) -> str:
    """``"ErrorType: first line of the message"`` (torch.load errors run over many lines)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


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
        raise WeightsUnavailableError(f"{path}: cannot read VGG-19 weights ({first_line(err)})") from None
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"{path}: not a state dict (got {type(state).__name__})")
    return state
