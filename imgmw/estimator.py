"""A scikit-learn-compatible Gaussian-mixture estimator on top of the batched EM core.

Accepts NumPy arrays or tensors ``[N, D]``; fitted attributes are NumPy arrays named as in
``sklearn.mixture.GaussianMixture`` (full covariances). With scikit-learn installed (an optional dependency)
the estimator is a ``BaseEstimator`` and ``DensityMixin``, its errors and warnings subclass scikit-learn's
``NotFittedError`` and ``ConvergenceWarning``, and it passes ``sklearn.utils.estimator_checks.check_estimator``
(tests/test_estimator.py). Without scikit-learn the same contract stands on its own: ``get_params`` /
``set_params`` from the constructor's signature, ``__sklearn_is_fitted__``, the input checks, and a
:class:`ConvergenceWarning` when a fit stops at ``max_iter``.
"""
from __future__ import annotations

import inspect
import math
import warnings

import numpy as np
import torch
from torch import Tensor

from .em import fit_gmm
from .gmm import GMM
from .linalg import cholesky_inverse_transpose, safe_cholesky

__all__ = ["GaussianMixture", "NotFittedError", "ConvergenceWarning"]

try:  # scikit-learn is optional: subclass its classes when present, so its filters, checks and tests see ours
    from sklearn.base import BaseEstimator as _Estimator, DensityMixin as _Density
    from sklearn.exceptions import ConvergenceWarning as _SklearnConvergenceWarning
    from sklearn.exceptions import NotFittedError as _SklearnNotFittedError
    _BASES: tuple[type, ...] = (_Density, _Estimator)
except ImportError:  # pragma: no cover - exercised only without scikit-learn
    _SklearnConvergenceWarning = UserWarning
    _BASES = ()

    class _SklearnNotFittedError(ValueError, AttributeError):  # type: ignore[no-redef]
        pass

DTYPES = {"float64": torch.float64, "float32": torch.float32}


class NotFittedError(_SklearnNotFittedError):
    """Raised when a method needs a fitted model (scikit-learn's NotFittedError when it is installed)."""


class ConvergenceWarning(_SklearnConvergenceWarning):
    """EM stopped at ``max_iter`` before its lower bound changed by less than ``tol``."""


def _seed_generator(random_state, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if random_state is None:
        gen.seed()
    elif isinstance(random_state, (int, np.integer)):
        gen.manual_seed(int(random_state))
    elif isinstance(random_state, np.random.RandomState):
        gen.manual_seed(int(random_state.randint(0, 2**31 - 1)))
    else:
        raise ValueError(f"random_state must be None, an int or a numpy RandomState, got {random_state!r}")
    return gen


def _same(a, b) -> bool:
    """Whether a parameter equals its default (arrays compare by identity: defaults are ``None``)."""
    try:
        return bool(a is b or a == b)
    except (TypeError, ValueError):  # arrays: ambiguous truth value
        return False


class GaussianMixture(*_BASES):  # type: ignore[misc]  # bases known at import time only
    """Full-covariance Gaussian mixture fitted by EM, with scikit-learn's estimator contract.

    Parameters follow ``sklearn.mixture.GaussianMixture`` (``n_components``, ``tol``, ``reg_covar``,
    ``max_iter``, ``n_init``, ``init_params`` in ``{"kmeans", "k-means++", "random",
    "random_from_data"}``, ``weights_init``, ``means_init``, ``precisions_init``, ``random_state``,
    ``warm_start``) plus ``device`` and ``dtype`` (``"float64"``, ``"float32"`` or a torch dtype) for the torch
    computation and ``fixed_weights``. With scikit-learn installed it is a ``BaseEstimator`` and ``DensityMixin``
    and passes ``sklearn.utils.estimator_checks.check_estimator``; input checks follow scikit-learn's wording.

    Attributes after ``fit``: ``weights_ [K]``, ``means_ [K, D]``, ``covariances_ [K, D, D]``,
    ``precisions_cholesky_``, ``precisions_``, ``converged_``, ``n_iter_``, ``lower_bound_``.

    Example:
        >>> gm = GaussianMixture(2, random_state=0).fit(np.random.randn(100, 2))
        >>> gm.predict(np.zeros((3, 2))).shape
        (3,)
    """

    _estimator_type = "DensityEstimator"
    _INIT = {"kmeans": "kmeans", "k-means++": "kmeans++", "kmeans++": "kmeans++", "random": "random",
             "random_from_data": "random_from_data"}

    def __init__(self, n_components: int = 1, *, covariance_type: str = "full", tol: float = 1e-3,
                 reg_covar: float = 1e-6, max_iter: int = 100, n_init: int = 1, init_params: str = "kmeans",
                 weights_init=None, means_init=None, precisions_init=None, random_state=None,
                 warm_start: bool = False, fixed_weights: bool = False, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype = "float64") -> None:
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.random_state = random_state
        self.warm_start = warm_start
        self.fixed_weights = fixed_weights
        self.device = device
        self.dtype = dtype

    # ----------------------------------------------------------------- estimator contract
    @classmethod
    def _param_names(cls) -> list[str]:
        return [name for name, p in inspect.signature(cls.__init__).parameters.items()
                if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def get_params(self, deep: bool = True) -> dict:
        """The constructor's parameters and their current values (scikit-learn's ``get_params``)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params) -> GaussianMixture:
        """Set constructor parameters by name; unknown names raise ValueError (scikit-learn's ``set_params``)."""
        valid = set(self._param_names())
        for name, value in params.items():
            if name not in valid:
                raise ValueError(f"invalid parameter {name!r} for GaussianMixture; valid ones: {sorted(valid)}")
            setattr(self, name, value)
        return self

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "means_")

    def __sklearn_tags__(self):
        """scikit-learn ≥ 1.6 reads the estimator type from tags (only scikit-learn calls this)."""
        from sklearn.utils import Tags, TargetTags

        return Tags(estimator_type="density_estimator", target_tags=TargetTags(required=False))

    def __repr__(self) -> str:
        defaults = {name: p.default for name, p in inspect.signature(type(self).__init__).parameters.items()}
        changed = [f"{k}={v!r}" for k, v in self.get_params().items() if not _same(v, defaults.get(k))]
        return f"GaussianMixture({', '.join(changed)})"

    # ----------------------------------------------------------------- helpers
    def _validate_params(self) -> None:
        if self.covariance_type != "full":
            raise ValueError(f"covariance_type must be 'full' (the only one implemented), got {self.covariance_type!r}")
        if not isinstance(self.n_components, (int, np.integer)) or self.n_components < 1:
            raise ValueError(f"n_components must be an integer >= 1, got {self.n_components!r}")
        if not isinstance(self.n_init, (int, np.integer)) or self.n_init < 1:
            raise ValueError(f"n_init must be an integer >= 1, got {self.n_init!r}")
        if not isinstance(self.max_iter, (int, np.integer)) or self.max_iter < 1:
            raise ValueError(f"max_iter must be an integer >= 1, got {self.max_iter!r}")
        if self.init_params not in self._INIT:
            raise ValueError(f"init_params must be one of {sorted(self._INIT)}, got {self.init_params!r}")
        if self.tol < 0:
            raise ValueError(f"tol must be >= 0, got {self.tol!r}")

    @property
    def _torch_dtype(self) -> torch.dtype:
        if isinstance(self.dtype, torch.dtype) and self.dtype in DTYPES.values():
            return self.dtype
        if self.dtype in DTYPES:
            return DTYPES[self.dtype]
        raise ValueError(f"dtype must be 'float64', 'float32' or the torch dtype, got {self.dtype!r}")

    def _tensor(self, x, name: str = "X", *, match_fitted: bool = True) -> Tensor:
        """``x`` as a finite ``[N, D]`` tensor (N, D >= 1); ``match_fitted`` also requires the fitted ``D``.
        Refuses sparse, complex and non-numeric input, with scikit-learn's messages."""
        if hasattr(x, "toarray") or type(x).__module__.startswith("scipy.sparse"):
            raise TypeError(f"Sparse data was passed for {name}, but dense data is required; use {name}.toarray()")
        if not isinstance(x, Tensor):
            a = np.asarray(x)
            if np.iscomplexobj(a):
                raise ValueError(f"Complex data not supported: {name} has dtype {a.dtype}")
            if a.dtype == object:  # numbers held as objects convert; anything else raises numpy's TypeError
                a = a.astype(np.float64)
            x = a
        elif x.is_complex():
            raise ValueError(f"Complex data not supported: {name} has dtype {x.dtype}")
        t = torch.as_tensor(x).to(device=self.device, dtype=self._torch_dtype)
        if t.dim() != 2:
            raise ValueError(f"Expected a 2D array for {name}, got shape {tuple(t.shape)}. Reshape your data either "
                             "using array.reshape(-1, 1) if your data has a single feature or array.reshape(1, -1) "
                             "if it contains a single sample.")
        if t.shape[0] < 1:
            raise ValueError(f"Found array with 0 sample(s) (shape={tuple(t.shape)}) while a minimum of 1 is required.")
        if t.shape[1] < 1:
            raise ValueError(f"Found array with 0 feature(s) (shape={tuple(t.shape)}) while a minimum of 1 is "
                             "required.")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or inf; remove or impute those samples first")
        if match_fitted and hasattr(self, "means_") and t.shape[1] != self.means_.shape[1]:
            raise ValueError(f"{name} has {t.shape[1]} features, but GaussianMixture is expecting "
                             f"{self.means_.shape[1]} features as input")
        return t

    def _user_init(self, d: int) -> GMM | None:
        if self.means_init is None:
            if self.weights_init is not None or self.precisions_init is not None:
                raise ValueError("weights_init/precisions_init need means_init too in this implementation")
            return None
        k = self.n_components
        means = torch.as_tensor(np.asarray(self.means_init), dtype=self._torch_dtype, device=self.device)
        if means.shape != (k, d):
            raise ValueError(f"means_init must have shape ({k}, {d}), got {tuple(means.shape)}")
        weights = (torch.full((k,), 1.0 / k, dtype=self._torch_dtype, device=self.device) if self.weights_init is None
                   else torch.as_tensor(np.asarray(self.weights_init), dtype=self._torch_dtype, device=self.device))
        if self.precisions_init is None:
            cov = torch.eye(d, dtype=self._torch_dtype, device=self.device).expand(k, d, d).clone()
        else:
            prec = torch.as_tensor(np.asarray(self.precisions_init), dtype=self._torch_dtype, device=self.device)
            if prec.shape != (k, d, d):
                raise ValueError(f"precisions_init must have shape ({k}, {d}, {d}), got {tuple(prec.shape)}")
            cov = torch.linalg.inv(prec)
            cov = 0.5 * (cov + cov.mT)
        return GMM(weights, means, cov)

    def _model(self) -> GMM:
        self._check_fitted()
        t = lambda a: torch.as_tensor(a, dtype=self._torch_dtype, device=self.device)  # noqa: E731
        return GMM(t(self.weights_), t(self.means_), t(self.covariances_))

    def _check_fitted(self) -> None:
        if not hasattr(self, "means_"):
            raise NotFittedError("This GaussianMixture instance is not fitted yet; call fit(X) first")

    def _store(self, gmm: GMM) -> None:
        self.weights_ = gmm.weights.cpu().numpy()
        self.means_ = gmm.means.cpu().numpy()
        self.covariances_ = gmm.covariances.cpu().numpy()
        chol = safe_cholesky(gmm.covariances)
        prec_chol = cholesky_inverse_transpose(chol)
        self.precisions_cholesky_ = prec_chol.cpu().numpy()
        self.precisions_ = (prec_chol @ prec_chol.mT).cpu().numpy()

    # ----------------------------------------------------------------- fitting
    def fit(self, X, y=None) -> GaussianMixture:
        """Fit by EM (``n_init`` restarts run as one batched fit; the best lower bound is kept)."""
        self._fit(X)
        self._warn_if_not_converged()
        return self

    def fit_predict(self, X, y=None) -> np.ndarray:
        """Fit and return the labels of ``X`` under the final parameters (equals ``fit(X).predict(X)``)."""
        labels = self._fit(X)
        self._warn_if_not_converged()
        return labels

    def _warn_if_not_converged(self) -> None:
        if not self.converged_ and self.tol > 0:  # stacklevel 3: the caller of fit / fit_predict
            warnings.warn(f"EM did not converge in max_iter={self.max_iter} steps (tol={self.tol:g}); raise max_iter "
                          "or tol, or check the data", ConvergenceWarning, stacklevel=3)

    def _fit(self, X) -> np.ndarray:
        """The fit; returns the labels of ``X``."""
        self._validate_params()
        x = self._tensor(X, match_fitted=self.warm_start)  # a cold refit may change the feature count
        n, d = x.shape
        if n < self.n_components:
            raise ValueError(f"n_samples={n} must be >= n_components={self.n_components}")
        init: GMM | str
        if self.warm_start and hasattr(self, "means_"):
            init, n_init = self._model(), 1
        else:
            user = self._user_init(d)
            init, n_init = (user, 1) if user is not None else (self._INIT[self.init_params], self.n_init)
        if isinstance(init, GMM):  # a batch of one: the given parameters
            init = GMM(init.weights[None], init.means[None], init.covariances[None])
        result = fit_gmm(x.expand(n_init, n, d), self.n_components, n_iter=self.max_iter, tol=self.tol,
                         init=init, fixed_weights=self.fixed_weights, reg_covar=self.reg_covar, grad="none",
                         generator=_seed_generator(self.random_state, x.device))
        best = int(torch.argmax(result.lower_bound))
        self._store(result.gmm[best])
        self.converged_ = bool(result.converged[best])
        self.n_iter_ = int(result.n_iter[best])
        self.lower_bound_ = float(result.lower_bound[best])
        self.n_features_in_ = d
        return result.log_resp[best].argmax(-1).cpu().numpy()

    # ----------------------------------------------------------------- inference
    def score_samples(self, X) -> np.ndarray:
        """Per-sample log-likelihood ``log p(x_n)``, shape ``[N]``."""
        return self._model().log_prob(self._tensor(X)).cpu().numpy()

    def score(self, X, y=None) -> float:
        """Mean per-sample log-likelihood (scikit-learn's sign: higher is better)."""
        return float(self.score_samples(X).mean())

    def predict_proba(self, X) -> np.ndarray:
        """Responsibilities ``[N, K]``."""
        lp = self._model().component_log_prob(self._tensor(X))
        return torch.softmax(lp, dim=-1).cpu().numpy()

    def predict(self, X) -> np.ndarray:
        """Most probable component per sample, ``[N]``."""
        return self._model().component_log_prob(self._tensor(X)).argmax(-1).cpu().numpy()

    def sample(self, n_samples: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """``(X [n, D], labels [n])`` drawn from the fitted mixture, seeded by ``random_state``."""
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        generator = _seed_generator(self.random_state, torch.device(self.device))
        x, labels = self._model().sample(n_samples, generator=generator)
        return x.cpu().numpy(), labels.cpu().numpy()

    # ----------------------------------------------------------------- model selection
    def _n_parameters(self) -> int:
        k, d = self.means_.shape
        return k * d * (d + 1) // 2 + k * d + (0 if self.fixed_weights else k - 1)

    def bic(self, X) -> float:
        """Bayesian information criterion ``−2 log L + p log N`` (lower is better)."""
        n = np.asarray(X).shape[0]
        return -2.0 * self.score(X) * n + self._n_parameters() * math.log(n)

    def aic(self, X) -> float:
        """Akaike information criterion ``−2 log L + 2p`` (lower is better)."""
        n = np.asarray(X).shape[0]
        return -2.0 * self.score(X) * n + 2 * self._n_parameters()
