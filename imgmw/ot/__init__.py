"""Optimal transport between Gaussian mixtures, laid out as POT lays out its modules.

- :mod:`imgmw.bures`: between two Gaussians (Bures cost matrix of all component pairs, Monge maps,
  barycentre of covariances);
- :mod:`imgmw.ot.discrete`: the ``K0 × K1`` discrete problems (network simplex; the KL-penalised
  unbalanced problem), on the host;
- :mod:`imgmw.ot.mixture`: MW2 and its unbalanced variant with envelope gradients, plans, barycentres;
- :mod:`imgmw.ot.maps`: transport maps of points from one mixture to another;
- :mod:`imgmw.ot.checks`: argument checks shared by all of them.
"""
from ..bures import gaussian_w2_cost
from .checks import LAMBDA_RANGE, check_gmm, check_unbalanced
from .discrete import solve_balanced, solve_unbalanced
from .maps import MAP_METHODS, gmm_ot_map
from .mixture import barycentre_weights, gmm_barycentre, gmm_ot_plan, mw2

__all__ = ["mw2", "gaussian_w2_cost", "gmm_ot_plan", "gmm_ot_map", "gmm_barycentre", "barycentre_weights",
           "MAP_METHODS", "check_gmm", "check_unbalanced", "LAMBDA_RANGE", "solve_balanced", "solve_unbalanced"]
