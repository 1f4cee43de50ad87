"""Scatter plots of 2-D point sets with the 2-σ ellipses of Gaussian mixtures (matplotlib, imported lazily)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def draw_ellipses(ax: Any, gmm: Any, **style: Any) -> None:
    """Draw the 2-σ ellipse of every component of the 2-D mixture ``gmm`` (weights ``[K]``) on ``ax``."""
    import numpy as np
    from matplotlib.patches import Ellipse

    for mean, cov in zip(gmm.means.detach().cpu().numpy(), gmm.covariances.detach().cpu().numpy()):
        vals, vecs = np.linalg.eigh(cov)
        angle = np.degrees(np.arctan2(vecs[1, 1], vecs[0, 1]))
        ax.add_patch(Ellipse(mean, 4 * np.sqrt(vals[1]), 4 * np.sqrt(vals[0]), angle=angle, fill=False, zorder=3,
                             **style))


def plot_barycentre(path: Path, targets: list, points: Any, fit: Any, history: list[float] | None,
                    generator: Any) -> None:
    """Target samples (with their ellipses) and the barycentre points ``[N, 2]`` (with the fit's, dashed) into
    the PNG ``path``; the objective per step on a second panel when ``history`` is given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if history else 1, figsize=(11 if history else 5.5, 5), squeeze=False)
    ax = axes[0, 0]
    for i, target in enumerate(targets):
        sample = target.sample(points.shape[0], generator)[0].cpu().numpy()
        ax.scatter(sample[:, 0], sample[:, 1], s=3, alpha=0.35, color=f"C{i}", label=f"target {i + 1}")
        draw_ellipses(ax, target, color=f"C{i}", lw=1.2)
    xy = points.cpu().numpy()
    ax.scatter(xy[:, 0], xy[:, 1], s=3, color="black", label="barycentre points")
    draw_ellipses(ax, fit, color="black", lw=1.5, ls="--")
    ax.set_aspect("equal")
    ax.legend(fontsize=8, loc="upper right", markerscale=3)
    ax.set_title("targets and their MW2 barycentre (dashed: EM fit, 2σ)")
    if history:
        curve = axes[0, 1]
        curve.plot(range(1, len(history) + 1), history, color="C0")
        curve.set_xlabel("flow step")
        curve.set_ylabel("Σ λ_i MW2²(EM(X), ν_i)")
        curve.set_title("objective")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
