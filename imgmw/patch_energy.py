"""Nearest-exemplar-patch energy: a differentiable term that rewards images built from the exemplar's patches.

Kwatra et al.'s texture optimisation (:mod:`imgmw.texture_refine`) lowers the energy

    E_s(x) = mean_j ‖R_j x_s − z_j‖² / D,     z_j = argmin_{e ∈ E_s} ‖R_j x_s − e‖²,

of every level ``x_s`` of the image's Gaussian pyramid (``R_j``: the ``p×p`` patch at grid position ``j``,
stride ``σ``; ``E_s``: a bank of the exemplar's ``p×p`` patches at the same level; ``D = C·p²``). The matches
``z_j`` are piecewise constant in ``x``, so ``∂E_s/∂x = 2/(n·D) Σ_j R_jᵀ (R_j x_s − z_j)`` almost everywhere (the
gradient of a minimum is the gradient of the active term), which is what autograd computes with the search done
without gradient. This module evaluates ``Σ_s E_s / S`` on a random subset of each level's patches, for a
network's training loss (:class:`imgmw.texture_net.TextureGeneratorTrainer`, weight ``nearest_weight``).

Why: the patch MW2 loss matches the *distribution* of patches with a few Gaussians per scale, whose samples
mix the colours of neighbouring structures (a stripe's two sides become a noisy blend); the nearest-patch
energy penalises every patch that is not close to some real exemplar patch, which a Gaussian's blend is not.
Alone it collapses to the exemplar's commonest patches (the projection's wash-out); beside the MW2 loss, which
keeps the proportions, it sharpens the structure. Measured with the texture network (default network and MW2
loss, 1500 steps at 128², Adam 5e-3 decaying, one thread; defaults here: 8×8 patches, stride 4, 3 levels, 16384
bank and 1024 query patches per level), mean over 256² samples of noise seeds 1–3, patch sliced-W2 / structure
distance (:mod:`imgmw.metrics`), for the weight ``λ`` of the energy beside ``Σ_s MW2²``:

============  ===============  ===============  ===============  ===============
exemplar      λ = 0            λ = 100          λ = 400          λ = 1600
============  ===============  ===============  ===============  ===============
stripes       0.0526 / 0.1074  0.0474 / 0.0796  0.0449 / 0.0631  0.1649 / 0.0525
bricks        0.0236 / 0.0728  0.0259 / 0.0467  0.0321 / 0.0333
hubble        0.0199 / 0.0366  0.0212 / 0.0312  0.0256 / 0.0241
============  ===============  ===============  ===============  ===============

The structure distance falls with ``λ`` everywhere; the patch sliced-W2 falls on the stripes (the grain of
blended colours goes, the bands come out flat) but rises on the brick wall (long horizontal joints, no
vertical ones, flatter bricks) and on the galaxies (fewer, larger objects, the small stars gone), and at
``λ = 1600`` the MW2 term loses (the stripes' patch sliced-W2 triples). On ``data/veins.png`` at ``λ = 400``:
0.0263 / 0.0246 with 43 % near-copies (short vertical cream strokes on flat green; the default network's
patch sliced-W2 is about 0.013). It costs about 0.12 s per step on one
thread (the search), as much as the rest of the step, so ``apps.train_generator`` leaves it off by default
(``--nearest-weight``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .patches import gaussian_pyramid
from .texture_refine import REFINE_PATCH, REFINE_STRIDE, nearest_patches, refine_n_scales
from .validation import check_positive_int, single_image

__all__ = ["NearestPatchEnergy"]


class NearestPatchEnergy(nn.Module):
    """``Σ_s E_s(x) / S`` (module docstring) of images ``x [B, C, H, W]`` against one exemplar.

    Args:
        exemplar: ``[C, h, w]`` or ``[1, C, h, w]``; its dtype and device are the energy's.
        patch: patch side ``p``.
        n_scales: pyramid levels ``S`` (:func:`imgmw.patches.gaussian_pyramid`, the same levels for the exemplar
            and the images); every exemplar level must hold a ``p×p`` patch. ``None``: the projection's rule,
            :func:`imgmw.texture_refine.refine_n_scales` of the exemplar's size (up to 3 levels whose sides stay
            ``>= 32``); pass ``refine_n_scales(exemplar_hw, image_hw)`` for smaller images.
        stride: grid stride ``σ`` of the images' patches.
        n_bank: exemplar patches per level (all of them, stride 1, when a level has fewer; else a random subset
            drawn once from ``generator``).
        n_queries: image patches per level and call (a random subset of the grid when it has more).
        periodic: the images wrap around (circular pyramid blur); the exemplar never does.
        generator: draws the bank subsets and each call's query subsets (on its device).

    Cost per call and level: ``n_queries · n_bank · C·p²`` multiply-adds for the search (chunked, no gradient)
    and ``n_queries · C·p²`` for the differentiable part.
    """

    def __init__(self, exemplar: Tensor, *, patch: int = REFINE_PATCH, n_scales: int | None = None,
                 stride: int = REFINE_STRIDE,
                 n_bank: int = 16384, n_queries: int = 1024, periodic: bool = False,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        u = single_image(exemplar, "exemplar")
        check_positive_int("patch", patch)
        if n_scales is None:
            n_scales = refine_n_scales((u.shape[-2], u.shape[-1]), (u.shape[-2], u.shape[-1]), patch)
        for name, value in (("n_scales", n_scales), ("stride", stride), ("n_bank", n_bank),
                            ("n_queries", n_queries)):
            check_positive_int(name, value)
        if min(u.shape[-2:]) >> (n_scales - 1) < max(patch, 3 if n_scales > 1 else 1):
            raise ValueError(f"the exemplar ({u.shape[-2]}x{u.shape[-1]}) is too small for {patch}x{patch} "
                             f"patches at {n_scales} level(s)")
        self.patch, self.n_scales, self.stride = patch, n_scales, stride
        self.n_queries, self.periodic, self.generator = n_queries, bool(periodic), generator
        for s, level in enumerate(gaussian_pyramid(u, n_scales)):
            bank = F.unfold(level, patch)[0].T                                     # [M, C·p²], stride 1
            if bank.shape[0] > n_bank:
                bank = bank[self._draw(bank.shape[0], n_bank).to(bank.device)]
            self.register_buffer(f"bank{s}", bank.contiguous())
            self.register_buffer(f"bank_sq{s}", bank.square().sum(1))

    def _draw(self, n: int, m: int) -> Tensor:
        """``m`` distinct indices of ``range(n)`` from the generator (on its device)."""
        device = self.generator.device if self.generator is not None else torch.device("cpu")
        return torch.randperm(n, generator=self.generator, device=device)[:m]

    def forward(self, images: Tensor) -> Tensor:
        """Scalar ``Σ_s E_s / S`` over the patches of every image in ``images [B, C, H, W]`` (differentiable)."""
        if images.dim() != 4:
            raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
        if min(images.shape[-2:]) >> (self.n_scales - 1) < self.patch:
            raise ValueError(f"images of {images.shape[-2]}x{images.shape[-1]} are too small for "
                             f"{self.patch}x{self.patch} patches at {self.n_scales} level(s)")
        total = images.new_zeros(())
        for s, level in enumerate(gaussian_pyramid(images, self.n_scales, periodic=self.periodic)):
            if self.periodic:
                level = F.pad(level, (0, self.patch - 1, 0, self.patch - 1), mode="circular")
            queries = F.unfold(level, self.patch, stride=self.stride).transpose(1, 2).flatten(0, 1)  # [B·n, D]
            if queries.shape[0] > self.n_queries:
                queries = queries[self._draw(queries.shape[0], self.n_queries).to(queries.device)]
            bank = getattr(self, f"bank{s}")
            index, _ = nearest_patches(queries.detach(), bank, bank_sq=getattr(self, f"bank_sq{s}"))
            total = total + (queries - bank[index]).square().mean()
        return total / self.n_scales
