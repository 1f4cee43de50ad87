# %% [markdown]
# # 1 · Batched EM: many Gaussian mixtures in one call
#
# `imgmw.fit_gmm` fits a Gaussian mixture to every set of points in a batch `x [*B, N, D]` at once. This
# notebook shows:
#
# 1. 256 mixtures fitted in one call, checked against the mixtures that drew the data;
# 2. ragged sets with a `mask`, and weighted points with `sample_weight`;
# 3. `imgmw.GaussianMixture`, the scikit-learn estimator on the same engine;
# 4. what the batch saves compared with a Python loop of fits.
#
# **Run time:** about a minute on a 2-core CPU, most of it in the timing section. The test suite runs it
# with `IMGMW_NB_SMALL=1`, which shrinks every size.

# %%
import os
import time
import warnings

import matplotlib.pyplot as plt
import numpy as np
import torch

import imgmw

from walkthrough import show

SMALL = os.environ.get("IMGMW_NB_SMALL") == "1"  # the test suite's switch: smaller sizes everywhere
torch.manual_seed(0)
torch.set_num_threads(1)  # small problems: on a shared 2-core machine a second thread mostly waits
plt.rcParams.update({"figure.dpi": 72, "axes.titlesize": 10})


def ellipse(ax, mean, cov, **kw):
    """Draw the 2-sigma ellipse of a 2-D Gaussian."""
    vals, vecs = np.linalg.eigh(np.asarray(cov))
    t = np.linspace(0, 2 * np.pi, 100)
    pts = np.asarray(mean)[:, None] + vecs @ (2 * np.sqrt(vals)[:, None] * np.stack([np.cos(t), np.sin(t)]))
    ax.plot(pts[0], pts[1], **kw)

# %% [markdown]
# ## 1. Many mixtures at once
#
# We draw `B` random 3-component mixtures in 2-D and `N` points from each. Every tensor keeps the batch in
# front: the points are `[B, N, D]`, the mixture's weights `[B, K]`, means `[B, K, D]` and covariances
# `[B, K, D, D]`. Everything here is float64; float32 works the same way and is faster.

# %%
def random_mixtures(n_sets, k, d, gen):
    """n_sets random mixtures: means ~ N(0, 3² I), random covariances, unequal weights."""
    means = 3.0 * torch.randn(n_sets, k, d, generator=gen, dtype=torch.float64)
    a = torch.randn(n_sets, k, d, d, generator=gen, dtype=torch.float64) / d ** 0.5
    covs = a @ a.mT + 0.05 * torch.eye(d, dtype=torch.float64)
    weights = torch.softmax(0.5 * torch.randn(n_sets, k, generator=gen, dtype=torch.float64), -1)
    return imgmw.GMM(weights, means, covs)


B, K, D, N = (32 if SMALL else 256), 3, 2, (400 if SMALL else 2000)
gen = torch.Generator().manual_seed(0)
truth = random_mixtures(B, K, D, gen)
x, labels = truth.sample(N, generator=gen)  # x: [B, N, D]
print("points:", tuple(x.shape), " true means:", tuple(truth.means.shape))

# %% [markdown]
# One call fits all of them. `tol` stops each set on its own once its mean log-likelihood changes by less
# than `tol` (finished sets are frozen while the others go on); `grad="none"` because we need no gradients
# here (the other modes are the subject of notebook 9).

# %%
t0 = time.perf_counter()
fit = imgmw.fit_gmm(x, K, n_iter=100, tol=1e-6, grad="none", generator=torch.Generator().manual_seed(1))
elapsed = time.perf_counter() - t0
print(f"{B} fits in {elapsed:.2f} s; converged {int(fit.converged.sum())}/{B}; "
      f"EM steps per set: median {int(fit.n_iter.median())}, max {int(fit.n_iter.max())}")

# %% [markdown]
# Six of the sets, coloured by the fitted responsibilities (`fit.log_resp [B, N, K]`), with the fitted
# components (solid 2-sigma ellipses) over the true ones (dashed); 300 points of each set are drawn. Axes are
# the two coordinates of the points.

# %%
fig, axes = plt.subplots(2, 3, figsize=(10, 6))
for ax, i in zip(axes.flat, range(6)):
    hard = fit.log_resp[i].argmax(-1)
    ax.scatter(x[i, :300, 0], x[i, :300, 1], c=hard[:300], s=2, cmap="viridis")
    for k in range(K):
        ellipse(ax, truth.means[i, k], truth.covariances[i, k], color="k", ls="--", lw=1)
        ellipse(ax, fit.gmm.means[i, k], fit.gmm.covariances[i, k], color="C3", lw=1.5)
    ax.set_title(f"set {i}: {int(fit.n_iter[i])} EM steps")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
fig.suptitle("fitted (red) and true (dashed) components, points coloured by fitted component")
fig.tight_layout()
show(fig)

# %% [markdown]
# EM only finds a local optimum, and a start can be unlucky. The batch makes restarts cheap: stack `R` copies
# of the data in a new leading batch dimension, fit all `R × B` problems in one call, and keep the best start
# of each set by its log-likelihood (`fit.lower_bound [R, B]`). This is what
# `imgmw.GaussianMixture(n_init=R)` does.

# %%
R = 4
multi = imgmw.fit_gmm(x.expand(R, B, N, D), K, n_iter=100, tol=1e-6, grad="none",
                      generator=torch.Generator().manual_seed(1))
best_of_r = multi.lower_bound.max(0).values  # [B]
true_ll = truth.log_prob(x).mean(-1)  # log-likelihood of each set under its true mixture

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
ax1.scatter(true_ll, fit.lower_bound, s=10, label="one start")
ax1.scatter(true_ll, best_of_r, s=10, marker="x", label=f"best of {R} starts")
lims = [float(true_ll.min()) - 0.1, float(true_ll.max()) + 0.1]
ax1.plot(lims, lims, "k--", lw=1, label="fit = truth")
ax1.set_xlabel("mean log-likelihood under the true mixture")
ax1.set_ylabel("mean log-likelihood of the fit")
ax1.set_title(f"{B} fits against their truth")
ax1.legend()
ax2.hist(fit.n_iter.numpy(), bins=30)
ax2.set_xlabel("EM steps until the log-likelihood changed by < 1e-6")
ax2.set_ylabel("number of sets")
ax2.set_title("every set stops on its own")
fig.tight_layout()
show(fig)
below_one, below_best = int((fit.lower_bound < true_ll - 0.02).sum()), int((best_of_r < true_ll - 0.02).sum())
print(f"sets more than 0.02 nats/point below their truth: {below_one} with one start, {below_best} with the best "
      f"of {R}")

# %% [markdown]
# ## 2. Ragged sets: masks
#
# Real batches rarely have equal sizes. Pad them to a common `N` and pass `mask [B, N]` (`True` = a real
# point): masked points are ignored exactly, whatever their values. To show it, we fill the padding with
# absurd values (1e6) and compare the batched fit with separate fits of the unpadded sets, all started from
# the same parameters (`init=` accepts a GMM) and run for the same number of steps.

# %%
lengths = torch.randint(N // 4, N + 1, (B,), generator=gen)
mask = torch.arange(N) < lengths[:, None]  # [B, N]
padded = torch.where(mask[..., None], x, torch.full_like(x, 1e6))
batched = imgmw.fit_gmm(padded, K, n_iter=30, init=truth, mask=mask, grad="none")
worst = 0.0
for i in range(min(B, 16)):
    alone = imgmw.fit_gmm(x[i, : lengths[i]], K, n_iter=30, init=truth[i], grad="none")
    worst = max(worst, float((alone.gmm.means - batched.gmm.means[i]).abs().max()))
print(f"set sizes from {int(lengths.min())} to {int(lengths.max())}; "
      f"largest difference of a mean between batched+masked and separate fits: {worst:.1e}")

# %% [markdown]
# ## 3. Weighted points: `sample_weight`
#
# A weight of 2 counts a point twice. This is how the colour apps fit millions of pixels: identical (or
# quantised) colours are merged into one point weighted by its count. Here one set of 200 000 points is
# rounded to a grid of step 0.05; the distinct points, weighted by their counts, give exactly the fit of all
# the rounded points, in a fraction of the time.

# %%
n_big = 20_000 if SMALL else 200_000
big, _ = truth[0].sample(n_big, generator=gen)
rounded = (big / 0.05).round() * 0.05
distinct, counts = torch.unique(rounded, dim=0, return_counts=True)
start = imgmw.fit_gmm(distinct, K, n_iter=1, sample_weight=counts.double(), grad="none",
                      generator=torch.Generator().manual_seed(2)).gmm  # a common starting point

t0 = time.perf_counter()
full = imgmw.fit_gmm(rounded, K, n_iter=50, init=start, grad="none")
t_full = time.perf_counter() - t0
t0 = time.perf_counter()
weighted = imgmw.fit_gmm(distinct, K, n_iter=50, init=start, sample_weight=counts.double(), grad="none")
t_weighted = time.perf_counter() - t0
print(f"{n_big} points -> {distinct.shape[0]} distinct points")
print(f"all points: {t_full:.3f} s; distinct + weights: {t_weighted:.3f} s; "
      f"largest difference of a mean: {float((full.gmm.means - weighted.gmm.means).abs().max()):.1e}")

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), sharex=True, sharey=True)
ax1.scatter(rounded[:3000, 0], rounded[:3000, 1], s=1)
ax1.set_title(f"3 000 of the {n_big} rounded points")
ax2.scatter(distinct[:, 0], distinct[:, 1], s=30 * counts.double() / counts.max())
ax2.set_title(f"all {distinct.shape[0]} distinct points, area ∝ weight")
for ax, g in ((ax1, full.gmm), (ax2, weighted.gmm)):
    for k in range(K):
        ellipse(ax, g.means[k], g.covariances[k], color="C3", lw=1.5)
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
fig.suptitle("the same fit (red ellipses) from all points and from weighted distinct points")
fig.tight_layout()
show(fig)

# %% [markdown]
# ## 4. The scikit-learn estimator
#
# `imgmw.GaussianMixture` has scikit-learn's `GaussianMixture` interface (full covariances): `fit`,
# `predict`, `predict_proba`, `score_samples`, `sample`, `bic`, `aic`, and the fitted attributes `weights_`,
# `means_`, `covariances_`, `lower_bound_`. Started from the same parameters, the two estimators agree to
# rounding error:

# %%
from sklearn.mixture import GaussianMixture as SklearnGaussianMixture

X = x[0].numpy()
init = dict(weights_init=truth.weights[0].numpy(), means_init=truth.means[0].numpy(),
            precisions_init=np.linalg.inv(truth.covariances[0].numpy()))
ours = imgmw.GaussianMixture(n_components=K, tol=1e-8, max_iter=500, **init).fit(X)
ref = SklearnGaussianMixture(n_components=K, tol=1e-8, max_iter=500, **init).fit(X)
print(f"lower bound: imgmw {ours.lower_bound_:.12f}, scikit-learn {ref.lower_bound_:.12f}")
print(f"largest difference of a mean: {np.abs(ours.means_ - ref.means_).max():.1e}; "
      f"same labels for {np.mean(ours.predict(X) == ref.predict(X)):.0%} of the points")

# %% [markdown]
# It is a scikit-learn `BaseEstimator`, so scikit-learn's tools take it as it is. Choosing the number of
# components by BIC (lower is better) and by 3-fold cross-validated log-likelihood (`GridSearchCV` uses the
# estimator's `score`, the mean log-likelihood; higher is better):

# %%
from sklearn.model_selection import GridSearchCV

ks = list(range(1, 5 if SMALL else 7))
bic = [imgmw.GaussianMixture(n_components=k, random_state=0, n_init=2).fit(X).bic(X) for k in ks]
search = GridSearchCV(imgmw.GaussianMixture(random_state=0, n_init=2), {"n_components": ks}, cv=3).fit(X)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
ax1.plot(ks, bic, "o-")
ax1.set_xlabel("number of components K")
ax1.set_ylabel("BIC")
ax1.set_title(f"BIC of set 0 (true K = {K})")
ax2.plot(ks, search.cv_results_["mean_test_score"], "o-")
ax2.set_xlabel("number of components K")
ax2.set_ylabel("held-out mean log-likelihood")
ax2.set_title(f"GridSearchCV picks K = {search.best_params_['n_components']}")
fig.tight_layout()
show(fig)

# %% [markdown]
# ## 5. Speed: one batched call against a loop
#
# The same work three ways: one `fit_gmm` call on the whole batch, a Python loop of `fit_gmm` calls (one
# set each), and a loop of scikit-learn fits (k-means++ start, like imgmw's default). All run exactly
# `T` EM steps (`tol` off) so that they do the same arithmetic, and all on one thread (`threadpool_limits`
# holds scikit-learn's BLAS to one thread, as `torch.set_num_threads(1)` holds torch). The loops are timed on a
# subset and reported per fit.

# %%
from threadpoolctl import threadpool_limits

T = 20
n_loop = 8 if SMALL else 32
torch.manual_seed(0)

t0 = time.perf_counter()
imgmw.fit_gmm(x, K, n_iter=T, grad="none", generator=torch.Generator().manual_seed(0))
per_fit = {"imgmw, one batched call": (time.perf_counter() - t0) / B}

t0 = time.perf_counter()
for i in range(n_loop):
    imgmw.fit_gmm(x[i], K, n_iter=T, grad="none", generator=torch.Generator().manual_seed(0))
per_fit["imgmw, loop of single fits"] = (time.perf_counter() - t0) / n_loop

t0 = time.perf_counter()
with warnings.catch_warnings(), threadpool_limits(1):
    warnings.simplefilter("ignore")  # tol=0 never converges: scikit-learn warns every time
    for i in range(n_loop):
        SklearnGaussianMixture(K, max_iter=T, tol=0, init_params="k-means++", random_state=0).fit(x[i].numpy())
per_fit["scikit-learn, loop"] = (time.perf_counter() - t0) / n_loop

fig, ax = plt.subplots(figsize=(7, 2.8))
names = list(per_fit)
ax.barh(names, [1e3 * per_fit[n] for n in names], color=["C2", "C0", "C1"])
ax.set_xscale("log")
ax.set_xlabel("milliseconds per fit (log scale)")
ax.set_ylabel("method")
ax.set_title(f"{T} EM steps, N={N}, D={D}, K={K}; batch of {B}")
for i, n in enumerate(names):
    ax.text(1e3 * per_fit[n], i, f" {1e3 * per_fit[n]:.2f} ms", va="center")
fig.tight_layout()
show(fig)
print(f"batched call: {per_fit['scikit-learn, loop'] / per_fit['imgmw, one batched call']:.0f}x faster per fit "
      f"than the scikit-learn loop, {per_fit['imgmw, loop of single fits'] / per_fit['imgmw, one batched call']:.0f}x "
      "faster than a loop of imgmw calls")

# %% [markdown]
# Small problems like these are dominated by per-call overhead, which the batch pays once. For large fits
# (millions of points, `D` in the hundreds) the E-step is chunked over `N`, so memory stays bounded.
#
# ## What next
#
# - The full-size comparison with scikit-learn (256 colour fits, a 60 000-patch fit, GEMM throughput):
#   `python benchmarks/bench_em.py`.
# - Fitting a patch prior of a whole image folder, one process or many:
#   `python -m apps.fit_prior data --patch 8 --k 64` (or under `torchrun`, see the README).
# - Notebook 2 compares the fitted mixtures with the Mixture-Wasserstein distance.
