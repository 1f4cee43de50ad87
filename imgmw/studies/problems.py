"""Problems of the gradient studies: random mixtures of a given conditioning, the fixed targets, the losses.

Every draw takes a :class:`torch.Generator` (or a seed) and draws in a fixed order, so one seed gives the same
problem on one device.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..gmm import GMM
from ..init import init_gmm
from ..ot import mw2

__all__ = ["CONDITIONS", "SEPARATIONS", "LOSS_MW2", "LOSS_PARAM", "LOSS_NAMES", "MODES", "Loss", "Progress", "seeded",
           "random_rotation", "random_gmm", "shifted_target", "parameter_loss", "make_loss", "stability_truth",
           "flow_problem", "scaling_problem"]

# Random mixtures of the accuracy study: name -> (separation: pairwise mean distance / √2, covariance condition).
CONDITIONS: dict[str, tuple[float, float]] = {"well": (4.0, 2.0), "medium": (2.0, 10.0), "bad": (1.0, 50.0)}
# Stability study: name -> pairwise mean distance of its 3-component 2-D mixture.
SEPARATIONS: dict[str, float] = {"separated": 4.0, "moderate": 2.0, "overlapping": 1.0}
LOSS_MW2 = "MW2^2(fit, target)"
LOSS_PARAM = "sum_k |m_k - t_k|^2 + |S_k - T_k|_F^2"
LOSS_NAMES = {"mw2": LOSS_MW2, "parameters": LOSS_PARAM}  # make_loss's kinds and the names results record
MODES = ("unrolled", "one_step", "implicit")  # the gradient modes of fit_gmm that the studies compare

Loss = Callable[[GMM], Tensor]
Progress = Callable[[str, int, int], None]  # progress(description, done, total), called after each unit of work


def seeded(seed: int, device: torch.device | str | None = None) -> torch.Generator:
    """A :class:`torch.Generator` on ``device`` seeded with ``seed``."""
    return torch.Generator(device=device or "cpu").manual_seed(seed)


def random_rotation(batch: int, n_features: int, generator: torch.Generator | None = None,
                    dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Tensor:
    """``[batch, D, D]`` orthogonal matrices (QR of Gaussian matrices, signs fixed by ``diag R > 0``)."""
    g = torch.randn(batch, n_features, n_features, generator=generator, dtype=dtype, device=device)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def random_gmm(batch: int, n_components: int, n_features: int, separation: float, condition: float,
               generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
               device: torch.device | str | None = None) -> GMM:
    """``batch`` random mixtures ``[batch, K, D]`` of a given separation and conditioning.

    Means are ``separation ×`` orthonormal directions (pairwise distance ``separation·√2``) when ``K ≤ D``, else
    ``separation ×`` standard normal; covariances ``R diag(λ) Rᵀ`` with random rotations ``R`` and ``λ``
    log-spaced over ``[condition^-½, condition^½]`` (condition number ``condition``, determinant 1); weights
    ``softmax(0.3·z)`` with ``z`` standard normal.
    """
    k, d = n_components, n_features
    if k <= d:
        means = separation * random_rotation(batch, d, generator, dtype, device)[..., :k].mT
    else:
        means = separation * torch.randn(batch, k, d, generator=generator, dtype=dtype, device=device)
    lam = torch.logspace(-0.5, 0.5, d, base=condition, dtype=dtype, device=device)
    rot = random_rotation(batch * k, d, generator, dtype, device).reshape(batch, k, d, d)
    cov = (rot * lam) @ rot.mT
    weights = torch.softmax(0.3 * torch.randn(batch, k, generator=generator, dtype=dtype, device=device), -1)
    return GMM(weights, means, 0.5 * (cov + cov.mT))


def shifted_target(gmm: GMM, shift: float = 0.5, scale: float = 1.3) -> GMM:
    """The fixed target ``ν`` of the gradient studies: ``gmm``'s means moved by ``shift`` along the first axis,
    covariances multiplied by ``scale``, weights kept."""
    means = gmm.means.clone()
    means[..., 0] += shift
    return GMM(gmm.weights, means, scale * gmm.covariances)


def parameter_loss(gmm: GMM, target: GMM) -> Tensor:
    """``Σ_k ‖m_k − t_k‖² + ‖Σ_k − T_k‖²_F`` ``[*B]`` between components of the same index."""
    dm = (gmm.means - target.means).square().sum((-1, -2))
    dc = (gmm.covariances - target.covariances).square().sum((-1, -2, -3))
    return dm + dc


def make_loss(target: GMM, kind: str = "mw2") -> tuple[Loss, str]:
    """``(loss(gmm) -> [*B], name)`` against ``target``: ``kind="mw2"`` is ``MW2²(gmm, target)``
    (:func:`imgmw.mw2`), ``kind="parameters"`` the :func:`parameter_loss`; ``name`` is what results record."""
    if kind not in LOSS_NAMES:
        raise ValueError(f"loss must be one of {sorted(LOSS_NAMES)}, got {kind!r}")
    if kind == "mw2":
        return (lambda gmm: mw2(gmm, target)), LOSS_MW2
    return (lambda gmm: parameter_loss(gmm, target)), LOSS_PARAM


def stability_truth(separation: float, seed: int, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float64) -> GMM:
    """A 3-component 2-D mixture (weights 0.5, 0.3, 0.2; covariances of eigenvalues 1 and 0.4, randomly
    rotated) with means on an equilateral triangle of side ``separation``."""
    gen = seeded(seed, device)
    angles = torch.tensor([0.0, 2.0, 4.0], dtype=dtype, device=device) * math.pi / 3
    means = separation / math.sqrt(3) * torch.stack([angles.cos(), angles.sin()], -1)
    rot = random_rotation(3, 2, gen, dtype, device)
    cov = (rot * torch.tensor([1.0, 0.4], dtype=dtype, device=device)) @ rot.mT
    return GMM(torch.tensor([0.5, 0.3, 0.2], dtype=dtype, device=device), means, 0.5 * (cov + cov.mT))


def flow_problem(seed: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float64) -> tuple[Tensor, GMM]:
    """``(x0 [200, 2], ν)``: 200 points drawn from a fixed 3-component 2-D mixture and a different fixed
    3-component target ``ν`` with uniform weights."""
    gen = seeded(seed, device)

    def t(values: list) -> Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    uniform = t([1 / 3] * 3)
    source = GMM(uniform, t([[-2.0, 0.0], [0.0, 2.0], [2.0, 0.0]]),
                 t([[[0.5, 0.2], [0.2, 0.3]], [[0.3, 0.0], [0.0, 0.3]], [[0.3, -0.1], [-0.1, 0.5]]]))
    target = GMM(uniform, t([[0.0, -2.5], [3.0, 2.0], [-3.0, 2.0]]),
                 t([[[1.0, 0.0], [0.0, 0.2]], [[0.2, 0.1], [0.1, 0.4]], [[0.5, -0.3], [-0.3, 0.5]]]))
    x0, _ = source.sample(200, generator=gen)
    return x0, target


def scaling_problem(n_features: int, n_points: int, seed: int, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float64, loss: str = "mw2") -> tuple[Tensor, GMM, Loss, str]:
    """``(x [1, N, D], k-means++ start, loss, loss name)`` for a separated 3-component mixture in ``D``
    dimensions (separation 3, condition 4) and its :func:`shifted_target`."""
    gen = seeded(seed, device)
    truth = random_gmm(1, 3, n_features, 3.0, 4.0, gen, dtype, device)
    x, _ = truth.sample(n_points, generator=gen)
    target_loss, name = make_loss(shifted_target(truth), loss)
    return x, init_gmm(x, 3, "kmeans++", generator=gen), target_loss, name
