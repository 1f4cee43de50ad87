"""Tests of :class:`imgmw.GaussianMixture`, mirroring scikit-learn's estimator tests.

The reference is ``sklearn.mixture.GaussianMixture`` itself: same starting parameters for EM parity, and
imgmw's fitted parameters copied into a scikit-learn object for the scores and information criteria.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from imgmw import GaussianMixture, fit_gmm
from imgmw.estimator import NotFittedError


def _as_sklearn(gm: GaussianMixture) -> SkGaussianMixture:
    """A scikit-learn estimator carrying imgmw's fitted parameters."""
    sk = SkGaussianMixture(gm.n_components, covariance_type="full")
    sk.weights_, sk.means_, sk.covariances_ = gm.weights_, gm.means_, gm.covariances_
    sk.precisions_cholesky_ = np.linalg.cholesky(np.linalg.inv(gm.covariances_))
    sk.n_features_in_ = gm.means_.shape[1]
    return sk


@pytest.fixture
def fitted(blobs):
    x = blobs(300, 3, 2, seed=20)
    return x, GaussianMixture(3, random_state=0).fit(x)


@pytest.mark.parametrize("n,k,d,t", [(400, 3, 2, 30), (3000, 4, 48, 10)])
def test_estimator_matches_sklearn_from_the_same_init(n, k, d, t, sklearn_fit, close_rel):
    x, (w, m, p), sk = sklearn_fit(n, k, d, t, seed=0)
    gm = GaussianMixture(k, tol=0.0, max_iter=t, weights_init=w, means_init=m, precisions_init=p).fit(x)
    assert gm.n_iter_ == sk.n_iter_ == t and gm.converged_ is False
    assert abs(gm.lower_bound_ - sk.lower_bound_) <= 1e-10 * abs(sk.lower_bound_)
    close_rel(gm.weights_, sk.weights_, 1e-8, "weights_")
    close_rel(gm.means_, sk.means_, 1e-8, "means_")
    close_rel(gm.covariances_, sk.covariances_, 1e-8, "covariances_")
    close_rel(gm.precisions_cholesky_, sk.precisions_cholesky_, 1e-7, "precisions_cholesky_")
    close_rel(gm.precisions_, sk.precisions_, 1e-7, "precisions_")
    assert np.array_equal(gm.predict(x), sk.predict(x))


def test_estimator_converged_and_n_iter_match_sklearn(sklearn_fit, close_rel):
    x, (w, m, p), sk = sklearn_fit(1000, 5, 6, 200, seed=1, tol=1e-3)
    gm = GaussianMixture(5, tol=1e-3, max_iter=200, weights_init=w, means_init=m, precisions_init=p).fit(x)
    assert sk.converged_ and gm.converged_ and gm.n_iter_ == sk.n_iter_ < 200
    close_rel(gm.means_, sk.means_, 1e-8, "means_")


@pytest.mark.filterwarnings("ignore::imgmw.estimator.ConvergenceWarning")  # max_iter=2 stops early on purpose
def test_fit_predict_equals_fit_then_predict(blobs):
    x = blobs(200, 3, 2, seed=21, spread=1.5)
    for max_iter, tol in ((2, 1e-3), (100, 1e-3), (5, 0.0)):
        labels = GaussianMixture(3, max_iter=max_iter, tol=tol, random_state=1).fit_predict(x)
        gm = GaussianMixture(3, max_iter=max_iter, tol=tol, random_state=1).fit(x)
        assert np.array_equal(labels, gm.predict(x))


def test_warm_start_equals_continued_fitting(blobs, start_params, close_rel):
    x = blobs(300, 3, 3, seed=22, spread=0.7)  # overlapping clusters: EM is still moving after 7 steps
    w, m, p = start_params(x, 3, seed=22)
    init = dict(weights_init=w, means_init=m, precisions_init=p)
    warm = GaussianMixture(3, tol=0.0, max_iter=4, warm_start=True, **init).fit(x)
    warm.max_iter = 3
    warm.fit(x)
    cold = GaussianMixture(3, tol=0.0, max_iter=7, **init).fit(x)
    assert warm.n_iter_ == 3
    close_rel(warm.means_, cold.means_, 1e-10, "means_")
    close_rel(warm.covariances_, cold.covariances_, 1e-10, "covariances_")
    close_rel(warm.weights_, cold.weights_, 1e-10, "weights_")
    assert abs(warm.lower_bound_ - cold.lower_bound_) <= 1e-12 * abs(cold.lower_bound_)
    restart = GaussianMixture(3, tol=0.0, max_iter=3, **init).fit(x)  # what ignoring warm_start would give
    assert not np.allclose(restart.means_, cold.means_, rtol=1e-6)


def test_n_init_keeps_the_best_lower_bound(blobs, close_rel):
    x = blobs(150, 4, 2, seed=23, spread=1.2)  # overlapping: restarts reach different local optima
    gm = GaussianMixture(4, n_init=5, init_params="random", max_iter=30, random_state=3).fit(x)
    # the five restarts, run as the estimator runs them (one batched fit seeded by random_state)
    runs = fit_gmm(torch.tensor(x).expand(5, *x.shape), 4, n_iter=30, tol=1e-3, init="random",
                   generator=torch.Generator().manual_seed(3), grad="none")
    bounds = runs.lower_bound.numpy()
    assert np.unique(np.round(bounds, 8)).size > 1  # the restarts differ
    best = int(np.argmax(bounds))
    assert gm.lower_bound_ == bounds.max()
    close_rel(gm.means_, runs.gmm.means[best], 1e-12, "means_ of the best restart")
    assert gm.n_iter_ == int(runs.n_iter[best])
    single = GaussianMixture(4, n_init=1, init_params="random", max_iter=30, random_state=3).fit(x)
    assert gm.lower_bound_ >= single.lower_bound_ - 1e-12


def test_bic_aic_match_sklearn_on_the_same_parameters(fitted):
    x, gm = fitted
    sk = _as_sklearn(gm)
    assert math.isclose(gm.bic(x), sk.bic(x), rel_tol=1e-12)
    assert math.isclose(gm.aic(x), sk.aic(x), rel_tol=1e-12)
    n, k, d = x.shape[0], 3, 2
    p = k * d * (d + 1) // 2 + k * d + k - 1  # the documented parameter count of a full-covariance GMM
    log_lik = sk.score(x) * n
    assert math.isclose(gm.bic(x), -2 * log_lik + p * math.log(n), rel_tol=1e-12)
    assert math.isclose(gm.aic(x), -2 * log_lik + 2 * p, rel_tol=1e-12)


def test_scores_and_probabilities_match_sklearn(fitted):
    x, gm = fitted
    sk = _as_sklearn(gm)
    np.testing.assert_allclose(gm.score_samples(x), sk.score_samples(x), rtol=1e-12)
    proba = gm.predict_proba(x)
    np.testing.assert_allclose(proba, sk.predict_proba(x), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=0, atol=1e-12)
    assert np.array_equal(gm.predict(x), sk.predict(x))
    assert math.isclose(gm.score(x), float(np.mean(gm.score_samples(x))), rel_tol=1e-14)
    assert math.isclose(gm.score(x), sk.score(x), rel_tol=1e-12)


def test_estimator_accepts_tensors():
    x = torch.randn(100, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gm = GaussianMixture(2, random_state=0).fit(x)
    np.testing.assert_allclose(gm.score_samples(x), gm.score_samples(x.numpy()), rtol=1e-14)


def test_sample_shapes_and_component_labels(fitted):
    _, gm = fitted
    xs, labels = gm.sample(3000)
    assert xs.shape == (3000, 2) and labels.shape == (3000,)
    assert set(np.unique(labels)) <= {0, 1, 2}
    np.testing.assert_allclose(np.bincount(labels, minlength=3) / 3000, gm.weights_, atol=0.04)
    for k in range(3):
        pts = xs[labels == k]
        se = np.sqrt(np.diag(gm.covariances_[k]) / len(pts))
        assert (np.abs(pts.mean(0) - gm.means_[k]) < 5 * se).all()
    again = gm.sample(3000)
    assert np.array_equal(xs, again[0])  # seeded by random_state
    with pytest.raises(ValueError, match="n_samples"):
        gm.sample(0)


def test_same_random_state_gives_the_same_fit(blobs):
    x = blobs(200, 3, 2, seed=24, spread=1.5)
    a = GaussianMixture(3, random_state=5, init_params="k-means++").fit(x)
    b = GaussianMixture(3, random_state=5, init_params="k-means++").fit(x)
    assert np.array_equal(a.means_, b.means_)


def test_refit_on_data_with_another_feature_count(blobs):
    gm = GaussianMixture(2, random_state=0).fit(blobs(50, 2, 2, seed=25))
    gm.fit(blobs(50, 2, 3, seed=25))
    assert gm.means_.shape == (2, 3)


def test_unfitted_model_raises():
    gm = GaussianMixture(2)
    for method in (gm.predict, gm.predict_proba, gm.score_samples, gm.score):
        with pytest.raises(NotFittedError, match="not fitted"):
            method(np.zeros((3, 2)))
    with pytest.raises(NotFittedError, match="not fitted"):
        gm.sample(3)


def test_wrong_feature_count_raises(fitted):
    _, gm = fitted
    for method in (gm.predict, gm.predict_proba, gm.score_samples, gm.score, gm.bic):
        with pytest.raises(ValueError, match="features"):
            method(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="Reshape your data"):
        gm.predict(np.zeros(4))


def test_passes_scikit_learns_estimator_checks():
    """Every check of sklearn.utils.estimator_checks.check_estimator (clone, tags, input validation with
    scikit-learn's messages, sparse/complex/object input, fit idempotence, pickling, n_features_in_, ...)."""
    from sklearn.base import DensityMixin
    from sklearn.utils.estimator_checks import check_estimator

    est = GaussianMixture(n_components=1, max_iter=20)
    assert isinstance(est, DensityMixin)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(est, on_fail=None)
    failed = [(r["check_name"], str(r["exception"]).splitlines()[0]) for r in results if r["status"] == "failed"]
    assert len(results) > 30 and not failed, failed


def test_non_finite_input_raises(fitted):
    x, gm = fitted
    bad = x[:5].copy()
    bad[2, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        gm.score_samples(bad)
    with pytest.raises(ValueError, match="NaN or inf"):
        GaussianMixture(2).fit(np.vstack([x, [[np.inf, 0.0]]]))


@pytest.mark.parametrize("kwargs,match", [
    ({"covariance_type": "diag"}, "covariance_type"),
    ({"n_components": 0}, "n_components"),
    ({"n_init": 0}, "n_init"),
    ({"max_iter": 0}, "max_iter"),
    ({"init_params": "bogus"}, "init_params"),
    ({"tol": -1.0}, "tol"),
    ({"reg_covar": -1.0}, "reg_covar"),
    ({"n_components": 20}, "n_components"),
    ({"means_init": np.zeros((3, 2))}, "means_init"),
])
def test_bad_parameters_raise(kwargs, match):
    x = np.random.default_rng(0).normal(size=(10, 2))
    with pytest.raises(ValueError, match=match):
        GaussianMixture(**{"n_components": 2, **kwargs}).fit(x)


def test_clone_get_set_params_and_repr():
    from sklearn.base import clone

    from imgmw import GaussianMixture as GM

    gm = GM(3, random_state=0, max_iter=7, reg_covar=1e-4)
    params = gm.get_params()
    assert params["n_components"] == 3 and params["max_iter"] == 7 and params["device"] == "cpu"
    twin = clone(gm)
    assert twin is not gm and twin.get_params() == params and not hasattr(twin, "means_")
    assert gm.set_params(n_components=2) is gm and gm.n_components == 2
    with pytest.raises(ValueError, match="invalid parameter 'bogus'"):
        gm.set_params(bogus=1)
    assert repr(GM(3, random_state=0)) == "GaussianMixture(n_components=3, random_state=0)"


def test_works_in_grid_search_and_pipelines():
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.utils.validation import check_is_fitted

    from imgmw import GaussianMixture as GM

    rng = np.random.RandomState(0)
    x = np.concatenate([rng.randn(200, 2) * 0.3 - 2, rng.randn(200, 2) * 0.3 + 2])
    search = GridSearchCV(GM(random_state=0), {"n_components": [1, 2, 3]}, cv=3).fit(x)
    assert search.best_params_["n_components"] >= 2              # two clear clusters: K=1 scores worse
    pipe = make_pipeline(StandardScaler(), GM(2, random_state=0)).fit(x)
    check_is_fitted(pipe[-1])
    assert pipe.score(x) > GM(1, random_state=0).fit(StandardScaler().fit_transform(x)).score(
        StandardScaler().fit_transform(x))


def test_stopping_at_max_iter_warns_like_scikit_learn():
    from sklearn.exceptions import ConvergenceWarning as SklearnWarning

    from imgmw import GaussianMixture as GM

    x = np.random.RandomState(1).randn(300, 2)
    with pytest.warns(SklearnWarning, match="max_iter=1") as record:
        GM(3, max_iter=1, random_state=0).fit(x)
    assert record[0].filename == __file__                           # reported at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GM(3, max_iter=200, random_state=0).fit(x)                 # converges: no warning
