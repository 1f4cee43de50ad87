"""Statistical stability of EM fits: ``MW2²`` between a fit on ``n`` samples and the true mixture, against ``n``.

K=3, d=2, three separation levels (:data:`SEPARATIONS`), the repeats of each ``n`` batched into one fit. With
estimated weights ``MW2²`` is linear in the weight errors, which are ``O(n^-1/2)``: the log-log slope of the
median against ``n`` is expected near ``-1/2``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..em import fit_gmm
from ..gmm import GMM
from ..ot import mw2
from .measures import loglog_slope, quartiles
from .problems import SEPARATIONS, Progress, seeded, stability_truth

__all__ = ["stability_study"]


def stability_study(*, n_points: Sequence[int] = (1000, 2000, 5000, 10000, 20000), repeats: int = 40,
                    n_iter: int = 200, seed: int = 0, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float64, progress: Progress | None = None) -> dict[str, Any]:
    """``MW2²(EM fit, truth)`` for every level of :data:`SEPARATIONS` and every ``n`` of ``n_points``.

    Level ``i``'s truth is :func:`stability_truth` from the seed ``seed + i``; the ``repeats`` samples of ``n``
    points ``[repeats, n, 2]`` and their k-means++ starts are drawn from the seed ``7919·seed + 101·i + n``, and
    fitted with ``n_iter`` EM steps. ``progress(description, done, total)`` (optional) is called after each ``n``.

    Returns a JSON-able dict: the settings and ``"levels"``: ``{level: {"separation", "rows": [{"n", quartiles
    of MW2² over the repeats}], "loglog_slope_of_median"}}``.
    """
    n_values = list(n_points)
    results: dict[str, Any] = {"command": "stability", "K": 3, "d": 2, "repeats": repeats, "em_steps": n_iter,
                               "init": "kmeans++", "n_values": n_values, "metric": "MW2^2(EM fit, truth)",
                               "levels": {}}
    for li, (level, sep) in enumerate(SEPARATIONS.items()):
        truth = stability_truth(sep, seed + li, device, dtype)
        batch = GMM(truth.weights.expand(repeats, 3), truth.means.expand(repeats, 3, 2),
                    truth.covariances.expand(repeats, 3, 2, 2))
        rows = []
        for j, n in enumerate(n_values):
            gen = seeded(seed * 7919 + li * 101 + n, device)
            x, _ = batch.sample(n, generator=gen)
            fit = fit_gmm(x, 3, n_iter=n_iter, init="kmeans++", grad="none", generator=gen)
            rows.append({"n": n, **quartiles(mw2(fit.gmm, truth))})
            if progress is not None:
                progress(f"stability {level}", j + 1, len(n_values))
        slope = loglog_slope([r["n"] for r in rows], [r["median"] for r in rows])
        results["levels"][level] = {"separation": sep, "rows": rows, "loglog_slope_of_median": slope}
    return results
