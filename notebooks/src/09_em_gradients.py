# %% [markdown]
# # 9 · Differentiating through EM
#
# Every loss in imgmw is a function of an EM fit: `loss = MW2²(EM(X), ν)`. Its gradient with respect to the
# data `X` has to go through the EM iterations, and `fit_gmm(..., grad=mode)` offers four ways:
#
# | `grad=` | what it differentiates | memory |
# |---|---|---|
# | `"unrolled"` | all `T` steps, by autograd (exact for the `T`-step map) | grows with `T` |
# | `"implicit"` | the fixed point `θ* = F(θ*, X)`, by the implicit function theorem (a linear solve) | one step |
# | `"one_step"` | only the last step, the others are constants (cheap, biased) | one step |
# | `"none"` | nothing: the fit is a constant | none |
#
# (Flows use a fifth way, `imgmw.WarmStartEM`: one differentiable EM step per optimiser step from the previous
# step's fit, the paper's Algorithm 3; its cost is one step, like `"one_step"`.)
#
# This notebook measures how accurate the cheap modes are against unrolled autodiff as `T` grows, and what
# each costs in memory.
#
# **Run time:** under half a minute on a 2-core CPU.

# %%
import os
import time

import matplotlib.pyplot as plt
import torch

import imgmw
from imgmw.implicit import last_solve_info
from imgmw.init import init_gmm

from walkthrough import show

SMALL = os.environ.get("IMGMW_NB_SMALL") == "1"  # the test suite's switch: smaller sizes everywhere
torch.manual_seed(0)
torch.set_num_threads(1)  # small problems: on a shared 2-core machine a second thread mostly waits
plt.rcParams.update({"figure.dpi": 72, "axes.titlesize": 10})


f64 = torch.float64
K, D = 3, 3

# %% [markdown]
# ## The problem
#
# Batches of random 3-component mixtures in 3-D: *separated* (means 5.7 apart, condition number 2) or
# *overlapping* (means 1.4 apart, elongated components, condition number 50). From each, `n` points; the loss
# is MW2² between their EM fit and a fixed target (the true mixture shifted and widened a little).

# %%
def rotations(shape, gen):
    q, r = torch.linalg.qr(torch.randn(*shape, D, D, generator=gen, dtype=f64))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # random orthogonal matrices


def random_mixtures(batch, sep, cond, gen):
    """Means at sep × orthonormal directions (pairwise distance sep·√2), covariances with condition `cond`."""
    means = sep * rotations((batch,), gen)[..., :K].mT
    q = rotations((batch, K), gen)
    lam = torch.logspace(-0.5, 0.5, D, base=cond, dtype=f64)
    covs = (q * lam) @ q.mT
    weights = torch.softmax(0.3 * torch.randn(batch, K, generator=gen, dtype=f64), -1)
    return imgmw.GMM(weights, means, 0.5 * (covs + covs.mT))


def shifted(g):
    means = g.means.clone()
    means[..., 0] += 0.5
    return imgmw.GMM(g.weights, means, 1.3 * g.covariances)


CONDITIONS = {"separated": (4.0, 2.0), "overlapping": (1.0, 50.0)}
draws = 6 if SMALL else 24
n = 200
problems = {}
for i, (name, (sep, cond)) in enumerate(CONDITIONS.items()):
    gen = torch.Generator().manual_seed(i)
    truth = random_mixtures(draws, sep, cond, gen)
    x, _ = truth.sample(n, generator=gen)
    problems[name] = (x, init_gmm(x, K, "kmeans++", generator=gen), shifted(truth))
print({name: tuple(p[0].shape) for name, p in problems.items()})

# %% [markdown]
# ## The four modes on one problem
#
# The same fit (same start, `T = 30` steps) in each mode, and the gradient of the loss with respect to the
# points. `"none"` returns a fit without a graph: the loss cannot be differentiated through it.

# %%
def gradient(x, start, target, n_iter, mode):
    """d loss / d x for the fit of x with T = n_iter steps in the given gradient mode."""
    xx = x.clone().requires_grad_(True)
    fit = imgmw.fit_gmm(xx, K, n_iter=n_iter, init=start, grad=mode)
    (g,) = torch.autograd.grad(imgmw.mw2(fit.gmm, target).sum(), xx)
    return g


def relative_error(g, ref):
    return ((g - ref).flatten(-2).norm(dim=-1) / ref.flatten(-2).norm(dim=-1))  # one value per draw


x, start, target = problems["separated"]
grads = {mode: gradient(x, start, target, 30, mode) for mode in ("unrolled", "implicit", "one_step")}
info = last_solve_info()  # what the implicit backward's linear solve did
for mode in ("implicit", "one_step"):
    error = relative_error(grads[mode], grads["unrolled"]).median()
    print(f"{mode:>9}: median relative error against unrolled {float(error):.1e}")
print(f"implicit solve: {info.solver}, {info.iterations} iterations, median fixed-point residual "
      f"{float(info.fixed_point_residual.median()):.1e}")
detached = imgmw.fit_gmm(x.clone().requires_grad_(True), K, n_iter=30, init=start, grad="none")
print("grad='none': the fitted means require grad?", detached.gmm.means.requires_grad)

# %% [markdown]
# ## Accuracy against T
#
# For every `T`, the gradient of each cheap mode against unrolled autodiff of the same `T`-step map, median
# and quartiles over the draws. The implicit gradient is the gradient *at the fixed point*: it is accurate
# once EM has converged, which takes longer when components overlap (EM's contraction rate is then close to
# 1). One-step keeps the bias of ignoring how the earlier steps depended on `X`.

# %%
ts = [1, 5, 20] if SMALL else [1, 2, 5, 10, 15, 20, 30, 40]
errors = {name: {"one_step": [], "implicit": []} for name in CONDITIONS}
residuals = {name: [] for name in CONDITIONS}
t0 = time.perf_counter()
for name, (x, start, target) in problems.items():
    for t in ts:
        ref = gradient(x, start, target, t, "unrolled")
        for mode in ("one_step", "implicit"):
            errors[name][mode].append(relative_error(gradient(x, start, target, t, mode), ref))
        residuals[name].append(float(last_solve_info().fixed_point_residual.median()))
print(f"{len(ts) * 3 * len(CONDITIONS)} batched fits and gradients in {time.perf_counter() - t0:.1f} s")

fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), sharey=True)
for ax, name in zip(axes, CONDITIONS):
    for mode, label in (("one_step", "one_step"), ("implicit", "implicit")):
        e = torch.stack(errors[name][mode]).clamp_min(1e-16)  # [len(ts), draws]
        q = torch.quantile(e, torch.tensor([0.25, 0.5, 0.75], dtype=f64), dim=1)
        line, = ax.plot(ts, q[1], "o-", label=f"{label} (median, quartiles)")
        ax.fill_between(ts, q[0], q[2], color=line.get_color(), alpha=0.2)
    ax.plot(ts, residuals[name], "k:", label="fixed-point residual of θ_T")
    ax.set_yscale("log")
    ax.set_xlabel("EM steps T")
    ax.set_title(f"{name} mixtures, n = {n}, d = {D}, K = {K}")
    ax.legend(fontsize=8)
axes[0].set_ylabel("relative error against unrolled autodiff")
fig.tight_layout()
show(fig)

# %% [markdown]
# On separated mixtures the implicit gradient's error falls with the fixed-point residual, by many orders
# of magnitude once `T` reaches 20–40; on overlapping ones EM is still moving at `T = 40` and the implicit
# gradient stays off by tens of per cent. One-step equals autodiff at `T = 1` (there is only one step) and
# stays at tens of per cent for every larger `T`.
#
# ## Memory against T
#
# Autograd keeps the intermediate tensors of every step it may differentiate. We count the bytes of the
# distinct tensors saved for backward (with `torch.autograd.graph.saved_tensors_hooks`) during the fit
# *and* its backward pass, and time the backward pass, for one set of 1000 points.

# %%
class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward while the context is active."""

    def __init__(self):
        self.storages = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def pack(self, t):
        storage = t.untyped_storage()
        self.storages[storage.data_ptr()] = storage  # kept alive, so an address is never counted twice
        return t

    def __enter__(self):
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    @property
    def mib(self):
        return sum(s.nbytes() for s in self.storages.values()) / 2**20


gen = torch.Generator().manual_seed(7)
truth = random_mixtures(1, 4.0, 2.0, gen)[0]
xm, _ = truth.sample(1000, generator=gen)
start_m, target_m = init_gmm(xm, K, "kmeans++", generator=gen), shifted(truth)
ts_mem = [1, 5, 20] if SMALL else [1, 5, 10, 25, 50, 100, 200]
memory = {m: [] for m in ("unrolled", "implicit", "one_step")}
seconds = {m: [] for m in memory}
for t in ts_mem:
    for mode in memory:
        xx = xm.clone().requires_grad_(True)
        with SavedBytes() as meter:
            fit = imgmw.fit_gmm(xx, K, n_iter=t, init=start_m, grad=mode)
            loss = imgmw.mw2(fit.gmm, target_m)
            t0 = time.perf_counter()
            loss.backward()
            seconds[mode].append(time.perf_counter() - t0)
        memory[mode].append(meter.mib)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.6))
for mode in memory:
    ax1.plot(ts_mem, memory[mode], "o-", label=mode)
    ax2.plot(ts_mem, seconds[mode], "o-", label=mode)
for ax, label, title in ((ax1, "MiB saved for backward", "memory"), (ax2, "seconds", "time of the backward pass")):
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("EM steps T")
    ax.set_ylabel(label)
    ax.set_title(f"{title} against T (n = 1000, d = {D}, K = {K})")
    ax.legend(fontsize=8)
fig.tight_layout()
show(fig)
print({mode: f"{memory[mode][-1]:.2f} MiB at T={ts_mem[-1]}" for mode in memory})

# %% [markdown]
# Unrolled autodiff's memory and backward time grow linearly with `T`; the implicit gradient's stay at those
# of one step (its backward solves a linear system with a few vector-Jacobian products of one step).
#
# **Which mode?** For a one-off fit, `"implicit"` with enough steps to converge (check
# `imgmw.implicit.last_solve_info().fixed_point_residual`); `"unrolled"` when EM is stopped early on purpose
# or converges slowly (overlapping components); `"one_step"` only when a biased gradient is acceptable. For
# flows, where `X` changes a little at every step, the warm start (`WarmStartEM`, inside every `MW2Loss`)
# is the cheapest and converged as fast as autodiff in the paper's 2-D flow.
#
# ## What next
#
# - `python -m apps.em_gradients accuracy` (60 draws, three conditionings, also the dense Jacobian of the
#   paper), `... flow` (a particle flow with each mode), `... stability` and `... scaling` (up to d = 192):
#   the studies behind the README's "Which gradient mode?".
