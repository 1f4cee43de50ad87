"""Patch priors of whole image folders: one GMM per pyramid scale over the patches of many images.

A prior is the ``K``-component mixture of the ``p×p`` colour patches (``D = 3p²``) of every image under a
folder, at each of ``S`` levels of the images' Gaussian pyramids: a :class:`~imgmw.gmm.GMM` with batch
``[S]``. It is fitted by EM over the patches of all images (:func:`fit_prior`), sharded over processes when
a ``process_group`` is given (:mod:`imgmw.distributed`): image ``i`` of the sorted list belongs to one rank
(contiguous blocks, :func:`imgmw.distributed.shard_range`), its patches are drawn with a generator seeded by
``(seed, i)`` alone, so the same patches enter the fit whatever the number of processes, and the k-means++ start runs
over the concatenated shards in image order. Every image contributes ``n_train`` training and ``n_held`` held-out
patches per scale; :func:`held_out_log_likelihood` scores the prior on the held-out ones.

Memory per rank: the images are read one at a time, so the resident data are the rank's patches,
``S · (n_train + n_held) · D`` floats per image, plus the fit's chunk temporaries and its ``[S, N, K]``
log-responsibilities.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .distributed import all_reduce_sum, check_process_group
from .em import EMResult, fit_gmm
from .gmm import GMM
from .image import load_image, resize_max
from .losses import data_reg_covar
from .patches import gather_patches, gaussian_pyramid, patch_grid

__all__ = ["IMAGE_SUFFIXES", "list_images", "image_generator", "sample_image_patches", "PatchSet",
           "iter_image_patches", "collect_patches", "fit_prior", "held_out_log_likelihood", "component_picture",
           "prior_to_dict", "prior_from_dict"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
SEED_STRIDE = 1_000_003  # per-image generator seed = seed · SEED_STRIDE + image index


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files (by suffix, :data:`IMAGE_SUFFIXES`) anywhere under ``folder``, sorted by path."""
    root = Path(folder)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def image_generator(seed: int, index: int) -> torch.Generator:
    """The generator of image ``index``'s patch draws: depends on ``(seed, index)`` only."""
    return torch.Generator().manual_seed((seed * SEED_STRIDE + index) % (1 << 63))


def sample_image_patches(img: Tensor, patch: int, n_scales: int, n_train: int, n_held: int,
                         generator: torch.Generator) -> tuple[Tensor, Tensor] | None:
    """Random patches of every pyramid level of ``img [3, H, W]``: ``(train [S, n_train, D], held [S, n_held, D])``.

    Positions are distinct (a random permutation of the level's patch grid) when the level has at least
    ``n_train + n_held`` of them, else drawn with replacement; the first ``n_train`` are for training.
    Returns ``None`` when the coarsest level is smaller than one patch."""
    if min(img.shape[-2:]) >> (n_scales - 1) < max(patch, 3):
        return None
    n = n_train + n_held
    train, held = [], []
    for level in gaussian_pyramid(img.unsqueeze(0), n_scales):
        rows, cols = patch_grid(level.shape[-2], level.shape[-1], patch)
        if rows * cols >= n:
            positions = torch.randperm(rows * cols, generator=generator)[:n]
        else:
            positions = torch.randint(rows * cols, (n,), generator=generator)
        values = gather_patches(level, patch, positions.to(level.device))[0]
        train.append(values[:n_train])
        held.append(values[n_train:])
    return torch.stack(train), torch.stack(held)


@dataclass
class PatchSet:
    """This rank's patches: ``train [S, N, D]``, ``held [S, M, D]``, the images used and those skipped
    (smaller than a patch at the coarsest scale)."""

    train: Tensor
    held: Tensor
    used: list[Path]
    skipped: list[Path]


def iter_image_patches(paths: Sequence[Path], indices: Sequence[int], *, patch: int, n_scales: int, n_train: int,
                       n_held: int, seed: int, max_side: int | None,
                       device: torch.device) -> Iterator[tuple[Path, tuple[Tensor, Tensor] | None]]:
    """For each ``i`` in ``indices``: ``(paths[i], sample_image_patches(...) or None)``, one image in memory
    at a time (downscaled to ``max_side`` first when given)."""
    for i in indices:
        img = load_image(paths[i]).to(device)
        if max_side is not None:
            img = resize_max(img, max_side)
        yield paths[i], sample_image_patches(img, patch, n_scales, n_train, n_held, image_generator(seed, i))


def collect_patches(paths: Sequence[Path], indices: Sequence[int], *, patch: int, n_scales: int, n_train: int,
                    n_held: int, seed: int, max_side: int | None = None,
                    device: torch.device | str = "cpu") -> PatchSet:
    """The :class:`PatchSet` of the images ``paths[i]``, ``i`` in ``indices`` (in that order)."""
    device = torch.device(device)
    d = 3 * patch * patch
    train = torch.empty(n_scales, len(indices) * n_train, d, device=device)
    held = torch.empty(n_scales, len(indices) * n_held, d, device=device)
    used: list[Path] = []
    skipped: list[Path] = []
    for path, sample in iter_image_patches(paths, indices, patch=patch, n_scales=n_scales, n_train=n_train,
                                           n_held=n_held, seed=seed, max_side=max_side, device=device):
        if sample is None:
            skipped.append(path)
            continue
        j = len(used)
        train[:, j * n_train:(j + 1) * n_train] = sample[0]
        held[:, j * n_held:(j + 1) * n_held] = sample[1]
        used.append(path)
    return PatchSet(train[:, :len(used) * n_train], held[:, :len(used) * n_held], used, skipped)


def _as_shard(x: Tensor) -> tuple[Tensor, Tensor | None]:
    """A rank without patches takes part with one masked-out point (the reductions need every rank)."""
    if x.shape[-2] > 0:
        return x, None
    return x.new_zeros(x.shape[0], 1, x.shape[-1]), torch.zeros(x.shape[0], 1, dtype=torch.bool, device=x.device)


def fit_prior(train: Tensor, n_components: int, *, n_iter: int = 100, tol: float | None = 1e-4,
              reg_factor: float = 1e-3, generator: torch.Generator | None = None, process_group=None) -> EMResult:
    """EM fit of ``K`` components per scale to ``train [S, N, D]`` (this rank's shard with a ``process_group``),
    from a (collective) k-means++ start, with ``reg_covar = reg_factor × λ_max`` of the patches' covariance."""
    group = check_process_group(process_group)
    x, mask = _as_shard(train)
    reg = data_reg_covar(x, mask, reg_factor, group)
    return fit_gmm(x, n_components, n_iter=n_iter, tol=tol, reg_covar=reg, grad="none", mask=mask,
                   generator=generator, process_group=group)


@torch.no_grad()
def held_out_log_likelihood(prior: GMM, held: Tensor, process_group=None) -> Tensor:
    """Mean ``log p(x)`` per held-out patch ``held [S, M, D]`` under ``prior`` (batch ``[S]``), over all ranks'
    patches: ``[S]`` (float64)."""
    group = check_process_group(process_group)
    if held.shape[-2] == 0:
        sums = held.new_zeros(held.shape[0], 2, dtype=torch.float64)
    else:
        log_p = prior.log_prob(held).double()
        sums = torch.stack([log_p.sum(-1), torch.full_like(log_p[:, 0], held.shape[-2])], dim=-1)
    sums = all_reduce_sum(sums, group)
    return sums[:, 0] / sums[:, 1]


@torch.no_grad()
def component_picture(prior: GMM, patch: int, zoom: int = 4, columns: int = 8) -> Tensor:
    """Picture ``[3, H, W]`` of a prior: per scale (top to bottom) a grid of its components by decreasing
    weight, each cell the mean patch beside its leading eigen-patch ``v₁`` (first principal direction of the
    component's covariance, scaled to fill [0, 1]), zoomed ``zoom``× with nearest-neighbour pixels."""
    from torchvision.utils import make_grid

    s, k, d = prior.means.shape
    _, vecs = torch.linalg.eigh(prior.covariances.double())
    lead = vecs[..., -1].to(prior.means.dtype)  # [S, K, D]
    lead = torch.where(lead.sum(-1, keepdim=True) < 0, -lead, lead)  # the sign with a non-negative sum
    lead = (lead - lead.amin(-1, keepdim=True)) / (lead.amax(-1, keepdim=True) - lead.amin(-1, keepdim=True))
    order = prior.weights.argsort(-1, descending=True)
    means = prior.means.gather(1, order.unsqueeze(-1).expand(s, k, d)).clamp(0, 1)
    lead = lead.gather(1, order.unsqueeze(-1).expand(s, k, d))
    cells = torch.cat([means.reshape(s, k, 3, patch, patch), lead.reshape(s, k, 3, patch, patch)], dim=-1)
    cells = cells.repeat_interleave(zoom, -2).repeat_interleave(zoom, -1)
    rows = [make_grid(cells[i].float().cpu(), nrow=min(columns, k), padding=zoom, pad_value=1.0) for i in range(s)]
    return make_grid(torch.stack(rows), nrow=1, padding=2 * zoom, pad_value=1.0)


def prior_to_dict(prior: GMM, **info) -> dict:
    """What ``prior.pt`` holds: the GMM's tensors (``weights``, ``means``, ``covariances``, batch ``[S]``)
    and ``info`` (patch size, scales, ...)."""
    return {"weights": prior.weights.cpu(), "means": prior.means.cpu(), "covariances": prior.covariances.cpu(),
            **info}


def prior_from_dict(state: dict) -> GMM:
    """The GMM of a ``prior.pt`` dictionary (:func:`prior_to_dict`)."""
    missing = [key for key in ("weights", "means", "covariances") if key not in state]
    if missing:
        raise ValueError(f"not a patch prior: keys {missing} are missing")
    return GMM(state["weights"], state["means"], state["covariances"])
