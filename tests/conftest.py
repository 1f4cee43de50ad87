"""Shared fixtures of the EM test-suite: synthetic mixture data, random starting parameters and a cached
scikit-learn reference fit (the independent oracle for the EM core).

The factories are returned by fixtures so that tests call them with their own sizes and seeds.
"""
from __future__ import annotations

import functools
import os
import warnings

import numpy as np
import pytest
import torch

from imgmw import GMM

# The suite runs many tiny batched ops; on a shared 2-core machine each intra-op parallel region can wait a
# scheduler slice for its second thread (a 2×2 batched Cholesky took 20 ms instead of 5 µs under load), so
# tests run single-threaded unless IMGMW_TEST_THREADS says otherwise.
torch.set_num_threads(int(os.environ.get("IMGMW_TEST_THREADS", "1")))


def _blobs(n: int, k: int, d: int, seed: int, *, spread: float = 3.0) -> np.ndarray:
    """``[n, d]`` float64 points from ``k`` Gaussian clusters with a shared random (correlated) covariance.

    Centres are ``spread``·N(0, I); the noise is ``z A`` with ``A`` a Gaussian ``d×d`` matrix scaled by
    ``1/√d``, so the features are correlated and the covariances moderately ill-conditioned (like patches).
    """
    rng = np.random.default_rng(seed)
    centres = spread * rng.normal(size=(k, d))
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    labels = rng.integers(0, k, n)
    return centres[labels] + rng.normal(size=(n, d)) @ mixing


def _start_params(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random but sensible starting ``(weights [k], means [k, d], precisions [k, d, d])`` for ``x [n, d]``.

    Means are distinct data points, covariances are scaled copies of the (regularised) data covariance.
    """
    rng = np.random.default_rng(seed + 1000)
    d = x.shape[1]
    weights = rng.uniform(0.5, 1.5, k)
    weights /= weights.sum()
    means = x[rng.choice(len(x), k, replace=False)]
    cov = np.atleast_2d(np.cov(x.T)) + 0.1 * np.eye(d)
    precisions = np.stack([np.linalg.inv(cov * s) for s in rng.uniform(0.5, 1.5, k)])
    return weights, means, precisions


def _gmm_from_precisions(weights: np.ndarray, means: np.ndarray, precisions: np.ndarray,
                         dtype: torch.dtype = torch.float64) -> GMM:
    """The imgmw GMM with the same parameters as scikit-learn's ``*_init`` arguments."""
    cov = np.linalg.inv(precisions)
    cov = 0.5 * (cov + np.swapaxes(cov, -1, -2))
    return GMM(torch.tensor(weights, dtype=dtype), torch.tensor(means, dtype=dtype), torch.tensor(cov, dtype=dtype))


@functools.cache
def _sklearn_fit(n: int, k: int, d: int, n_iter: int, seed: int, tol: float = 0.0):
    """scikit-learn's float64 EM from ``_start_params``; returns ``(x, (w, m, P), fitted estimator)``."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    x = _blobs(n, k, d, seed)
    w, m, p = _start_params(x, k, seed)
    est = GaussianMixture(k, covariance_type="full", tol=tol, max_iter=n_iter, reg_covar=1e-6,
                          weights_init=w, means_init=m, precisions_init=p, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(x)
    return x, (w, m, p), est


@pytest.fixture
def blobs():
    """Factory ``blobs(n, k, d, seed, spread=3.0) -> np.ndarray [n, d]`` (float64)."""
    return _blobs


@pytest.fixture
def start_params():
    """Factory ``start_params(x, k, seed) -> (weights, means, precisions)`` as NumPy arrays."""
    return _start_params


@pytest.fixture
def gmm_from_precisions():
    """Factory turning scikit-learn-style ``(weights, means, precisions)`` into an imgmw ``GMM``."""
    return _gmm_from_precisions


@pytest.fixture
def sklearn_fit():
    """Cached factory ``sklearn_fit(n, k, d, n_iter, seed, tol=0.0) -> (x, (w, m, P), estimator)``."""
    return _sklearn_fit


def assert_close_rel(actual, expected, rel: float, what: str = "") -> None:
    """``|actual − expected| ≤ rel · max|expected|`` element-wise (a scale-relative tolerance)."""
    a = np.asarray(actual.detach().cpu() if isinstance(actual, torch.Tensor) else actual, dtype=np.float64)
    e = np.asarray(expected.detach().cpu() if isinstance(expected, torch.Tensor) else expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    scale = max(float(np.abs(e).max()), np.finfo(np.float64).tiny)
    err = float(np.abs(a - e).max()) / scale
    assert err <= rel, f"{what}: relative error {err:.3g} > {rel:.3g}"


@pytest.fixture
def close_rel():
    """The scale-relative comparison :func:`assert_close_rel`."""
    return assert_close_rel
