# %% [markdown]
# # 2 · MW2 and optimal transport between Gaussian mixtures
#
# The Mixture-Wasserstein distance compares two Gaussian mixtures `a = Σ_k w_k N(m_k, Σ_k)` and
# `b = Σ_l w'_l N(m'_l, Σ'_l)` by moving the mass of components onto components:
#
# `MW2²(a, b) = min_P Σ_kl P_kl C_kl`, where `C_kl = W2²(N(m_k, Σ_k), N(m'_l, Σ'_l))` is the Wasserstein
# cost between two Gaussians (closed form) and the plan `P ≥ 0` has row sums `w` and column sums `w'`.
#
# This notebook goes through the costs and plans, MW2² and its gradient, transport maps between mixtures,
# barycentres, and unbalanced MW2, which stays small when one side has outliers.
#
# **Run time:** under a minute on a 2-core CPU.

# %%
import math
import os

import matplotlib.pyplot as plt
import numpy as np
import torch

import imgmw
from imgmw.barycentre import demo_targets
from imgmw.metrics import random_directions, sliced_w2

from walkthrough import show

SMALL = os.environ.get("IMGMW_NB_SMALL") == "1"  # the test suite's switch: smaller sizes everywhere
torch.manual_seed(0)
torch.set_num_threads(1)  # small problems: on a shared 2-core machine a second thread mostly waits
plt.rcParams.update({"figure.dpi": 72, "axes.titlesize": 10})


f64 = torch.float64


def ellipse(ax, mean, cov, **kw):
    """Draw the 2-sigma ellipse of a 2-D Gaussian."""
    vals, vecs = np.linalg.eigh(np.asarray(cov, dtype=float))
    t = np.linspace(0, 2 * np.pi, 100)
    circle = np.stack([np.cos(t), np.sin(t)])
    pts = np.asarray(mean, dtype=float)[:, None] + vecs @ (2 * np.sqrt(vals)[:, None] * circle)
    return ax.plot(pts[0], pts[1], **kw)


def draw_gmm(ax, g, color, label=None, **kw):
    for k in range(g.n_components):
        ellipse(ax, g.means[k], g.covariances[k], color=color, label=label if k == 0 else None, **kw)

# %% [markdown]
# ## 1. Costs, plan and distance
#
# Two mixtures in 2-D: `a` with 3 components, `b` with 4 (the numbers of components need not match).

# %%
def rot(deg):
    t = math.radians(deg)
    return torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]], dtype=f64)


def cov(s1, s2, deg):
    r = rot(deg)
    return r @ torch.diag(torch.tensor([s1, s2], dtype=f64)) @ r.T


a = imgmw.GMM(torch.tensor([0.3, 0.3, 0.4], dtype=f64),
              torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], dtype=f64),
              torch.stack([cov(0.6, 0.1, 30), cov(0.4, 0.2, -60), cov(0.8, 0.1, 0)]))
b = imgmw.GMM(torch.tensor([0.25, 0.25, 0.3, 0.2], dtype=f64),
              torch.tensor([[-1.0, 3.0], [3.0, 3.5], [2.0, -1.5], [-3.0, -2.5]], dtype=f64),
              torch.stack([cov(0.3, 0.3, 0), cov(0.7, 0.1, 45), cov(0.5, 0.2, 90), cov(0.4, 0.1, -20)]))

C = imgmw.gaussian_w2_cost(a, b)  # [3, 4]: W2² between every pair of components
P = imgmw.gmm_ot_plan(a, b)  # [3, 4]: the optimal plan (exact linear programme)
d2 = imgmw.mw2(a, b)
print(f"MW2²(a, b) = {float(d2):.4f}   Σ P·C = {float((P * C).sum()):.4f}")
print("row sums of P:", P.sum(1).numpy().round(3), " = weights of a:", a.weights.numpy())
print("column sums of P:", P.sum(0).numpy().round(3), " = weights of b:", b.weights.numpy())

# %% [markdown]
# Left: the two mixtures (2-sigma ellipses) and the plan: a segment joins the means of components `k` and `l`
# when `P_kl > 0`, its width proportional to the mass moved. Middle and right: the cost and plan matrices.
# Most components of `a` send their mass to one component of `b`; where the weights do not match, a
# component splits (this is why the plan is not a permutation).

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 4))
ax = axes[0]
draw_gmm(ax, a, "C0", "a")
draw_gmm(ax, b, "C1", "b")
for k in range(3):
    for j in range(4):
        if P[k, j] > 1e-9:
            ax.plot(*zip(a.means[k].numpy(), b.means[j].numpy()), color="k", lw=20 * float(P[k, j]), alpha=0.5)
ax.set_aspect("equal")
ax.set_xlabel("$x_1$")
ax.set_ylabel("$x_2$")
ax.set_title("mixtures a, b and the plan (width ∝ mass)")
ax.legend()
for ax, mat, title in ((axes[1], C, "cost $C_{kl}$ = W2² between components"), (axes[2], P, "optimal plan $P_{kl}$")):
    im = ax.imshow(mat.numpy(), cmap="viridis")
    for (k, j), v in np.ndenumerate(mat.numpy()):
        ax.text(j, k, f"{v:.2f}", ha="center", va="center", color="w" if v < mat.max() / 2 else "k", fontsize=9)
    ax.set_xlabel("component l of b")
    ax.set_ylabel("component k of a")
    ax.set_xticks(range(4))
    ax.set_yticks(range(3))
    ax.set_title(title)
    fig.colorbar(im, ax=ax, shrink=0.7)
fig.tight_layout()
show(fig)

# %% [markdown]
# ## 2. Gradients, and batches
#
# `mw2` is differentiable in the weights, means and covariances of both mixtures (by the envelope theorem:
# the plan is held fixed). Below, gradient descent on the means of `a` alone, weights and covariances fixed:
# each mean follows `−∇ MW2²`. The arrows (left) are the first gradient step; the curve (right) is MW2²
# along the descent. It does not reach 0: `a` keeps its 3 components and their shapes.

# %%
means = a.means.clone().requires_grad_(True)
opt = torch.optim.SGD([means], lr=0.5)
history, first_grad = [], None
for _ in range(60):
    opt.zero_grad()
    loss = imgmw.mw2(imgmw.GMM(a.weights, means, a.covariances), b)
    loss.backward()
    if first_grad is None:
        first_grad = means.grad.clone()
    history.append(loss.item())
    opt.step()
moved = imgmw.GMM(a.weights, means.detach(), a.covariances)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
draw_gmm(ax1, a, "C0", "a (start)")
draw_gmm(ax1, b, "C1", "b")
draw_gmm(ax1, moved, "C2", "a after 60 steps", ls="--")
ax1.quiver(a.means[:, 0], a.means[:, 1], -first_grad[:, 0], -first_grad[:, 1], angles="xy", scale_units="xy",
           scale=1, color="k", width=0.006, label="−gradient")
ax1.set_aspect("equal")
ax1.set_xlabel("$x_1$")
ax1.set_ylabel("$x_2$")
ax1.set_title("descent on the means of a")
ax1.legend(fontsize=8)
ax2.plot(history)
ax2.set_xlabel("gradient step")
ax2.set_ylabel("MW2²(a, b)")
ax2.set_title("MW2² along the descent")
fig.tight_layout()
show(fig)

# %% [markdown]
# Batch shapes broadcast, and a batch is solved in one call. Here: the distance from `a` to 360 copies of
# itself rotated about the origin by 0°…359°. It is 0 only at 0°, and the bumps show the rotations that
# nearly map components onto components.

# %%
angles = torch.arange(360 if not SMALL else 90) * (360 / (360 if not SMALL else 90))
rots = torch.stack([rot(float(t)) for t in angles])  # [A, 2, 2]
turned = imgmw.GMM(a.weights.expand(len(angles), 3), a.means @ rots.mT,
                   rots[:, None] @ a.covariances @ rots[:, None].mT)
dist = imgmw.mw2(a, turned)  # a broadcasts against the batch [A]
fig, ax = plt.subplots(figsize=(7, 3))
ax.plot(angles, dist)
ax.set_xlabel("rotation angle (degrees)")
ax.set_ylabel("MW2²(a, rotated a)")
ax.set_title(f"{len(angles)} distances in one call")
fig.tight_layout()
show(fig)

# %% [markdown]
# ## 3. Transport maps between mixtures
#
# `gmm_ot_map(x, a, b, method)` moves points drawn from `a` towards `b` using the plan and the Gaussian
# Monge maps `T_kl` between matched components (Delon & Desolneux):
#
# - `"bary"`: each point moves to the average of the `T_kl(x)`, weighted by its posterior over the components
#   of `a` and the plan's rows. A smooth map, but it averages, so its output is more concentrated than `b`.
# - `"rand"`: each point draws one pair `(k, l)` and moves by `T_kl`. Not smooth, but its output follows `b`.
#
# The sliced W2 distance to a sample of `b` (lower is closer) measures how well each output matches `b`;
# two independent samples of `b` are not at distance 0 either (the numbers of points per component
# fluctuate), which gives the noise level.

# %%
n = 1000 if SMALL else 4000
gen = torch.Generator().manual_seed(0)
xs, comp = a.sample(n, generator=gen)
y_bary = imgmw.gmm_ot_map(xs, a, b, "bary")
y_rand = imgmw.gmm_ot_map(xs, a, b, "rand", generator=gen)
yb, _ = b.sample(n, generator=gen)
theta = random_directions(64, 2, seed=0)
sw = {name: float(sliced_w2(pts, yb, theta)) for name, pts in
      (("source a", xs), ("bary map", y_bary), ("rand map", y_rand))}
yb2, _ = b.sample(n, generator=gen)
sw["another sample of b"] = float(sliced_w2(yb2, yb, theta))
print("sliced W2 to a sample of b:", {k: round(v, 3) for k, v in sw.items()})

fig, axes = plt.subplots(1, 4, figsize=(14, 3.6), sharex=True, sharey=True)
shown = slice(0, 1500)
panels = [(xs, "points drawn from a"), (y_bary, f"bary map (SW2 {sw['bary map']:.3f})"),
          (y_rand, f"rand map (SW2 {sw['rand map']:.3f})"), (yb, "points drawn from b")]
for ax, (pts, title) in zip(axes, panels):
    colours = {"c": "C1"} if pts is yb else {"c": comp[shown], "cmap": "viridis"}
    ax.scatter(pts[shown, 0], pts[shown, 1], s=2, **colours)
    draw_gmm(ax, b, "C1", lw=0.8)
    ax.set_title(title)
    ax.set_xlabel("$x_1$")
    ax.set_aspect("equal")
axes[0].set_ylabel("$x_2$")
fig.suptitle("colour = the component of a each point was drawn from; orange ellipses: b")
fig.tight_layout()
show(fig)

# %% [markdown]
# ## 4. Barycentres
#
# `gmm_barycentre(gmms, weights)` finds a `K`-component mixture that minimises `Σ_i λ_i MW2²(μ, ν_i)`
# (a fixed point on the plans and the components, which reaches a local minimum; notebook 6 compares it
# with a flow of points). Left: three 2-component mixtures and their barycentre with equal weights. Right: the
# barycentres between the first two as the weight moves from one to the other, a path of mixtures that
# moves and turns components instead of fading one mixture into the other.

# %%
targets = demo_targets()
bary = imgmw.gmm_barycentre(targets)
objective = sum(float(imgmw.mw2(bary, t)) for t in targets) / 3
print(f"Σ λ_i MW2²(barycentre, ν_i) = {objective:.4f}")

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
for i, t in enumerate(targets):
    draw_gmm(ax1, t, f"C{i}", f"ν{i + 1}")
draw_gmm(ax1, bary, "k", "barycentre", lw=2)
ax1.set_title("equal weights")
ts = np.linspace(0, 1, 6)
cmap = plt.get_cmap("coolwarm")
for t in ts:
    path = imgmw.gmm_barycentre(targets[:2], [1 - t, t])
    draw_gmm(ax2, path, cmap(t), f"t = {t:.1f}")
ax2.set_title("weights (1 − t, t) between ν1 and ν2")
for ax in (ax1, ax2):
    ax.set_aspect("equal")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    ax.legend(fontsize=8, loc="upper right")
fig.tight_layout()
show(fig)

# %% [markdown]
# ## 5. Unbalanced MW2 and outliers
#
# Balanced MW2 must move *all* the mass: if 5 % of one data set are outliers at distance `d`, that 5 % has
# to travel, and MW2² grows like `0.05·d²`. The unbalanced variant `mw2(a, b, unbalanced=(λa, λb))` replaces
# the marginal constraints by penalties `λa KL(P1 | w) + λb KL(Pᵀ1 | w')`: mass may be left behind at a
# price, so the cost of the outliers is capped at about `λ × their mass`.
#
# The experiment: data sets of points drawn from `a` where 5 % are replaced by outliers at distance `d`
# from the origin, for several `d`, all fitted in one batched `fit_gmm` call with 4 components (one to
# absorb the outliers), and compared with the clean mixture `a`.

# %%
ds = torch.tensor([0.0, 2, 4, 6, 8, 10, 12, 15, 20], dtype=f64)
n_pts = 1000 if SMALL else 4000
clean, _ = a.sample(n_pts, generator=gen)
n_out = n_pts // 20
direction = torch.tensor([0.6, 0.8], dtype=f64)
sets = clean.expand(len(ds), n_pts, 2).clone()
sets[:, :n_out] = ds[:, None, None] * direction + 0.3 * torch.randn(len(ds), n_out, 2, generator=gen, dtype=f64)
fits = imgmw.fit_gmm(sets, 4, n_iter=200, tol=1e-6, grad="none", generator=gen).gmm  # 9 fits at once

balanced = imgmw.mw2(fits, a)
curves = {f"unbalanced, λ = {lam:g}": imgmw.mw2(fits, a, unbalanced=(lam, lam)) for lam in (0.1, 1.0, 10.0)}
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
ax1.plot(ds, balanced, "o-", label="balanced MW2²")
for name, values in curves.items():
    ax1.plot(ds, values, "o-", label=name)
ax1.plot(ds, 0.05 * ds ** 2, "k:", label="0.05·d²")
ax1.set_yscale("log")
ax1.set_xlabel("distance d of the outliers from the origin")
ax1.set_ylabel("distance² to the clean mixture a")
ax1.set_title("5 % outliers: balanced vs unbalanced")
ax1.legend(fontsize=8)

i = int((ds == 12).nonzero())
plans = {"balanced plan": imgmw.gmm_ot_plan(fits[i], a),
         "unbalanced plan, λ = 1": imgmw.gmm_ot_plan(fits[i], a, unbalanced=(1.0, 1.0))}
order = fits[i].means.norm(dim=-1).argsort()  # the outlier component last
stacked = np.concatenate([p[order].numpy() for p in plans.values()], axis=1)
im = ax2.imshow(stacked, cmap="viridis")
ax2.axvline(2.5, color="w", lw=3)
ax2.set_xticks(range(6), ["a1", "a2", "a3"] * 2)
ax2.set_yticks(range(4), [f"fit {j + 1}" for j in range(3)] + ["fit 4 (outliers)"])
ax2.set_xlabel("component of a  (left: balanced, right: unbalanced λ = 1)")
ax2.set_ylabel("component of the fit")
ax2.set_title("plans at d = 12: the outliers' row is left out")
fig.colorbar(im, ax=ax2, shrink=0.8)
fig.tight_layout()
show(fig)
print(f"weight of the outlier component at d=12: {float(fits[i].weights[order[-1]]):.3f}; "
      f"mass it sends, balanced: {float(plans['balanced plan'][order[-1]].sum()):.3f}, "
      f"unbalanced: {float(plans['unbalanced plan, λ = 1'][order[-1]].sum()):.4f}")

# %% [markdown]
# The balanced distance follows `0.05·d²` once the outliers leave the data; the unbalanced ones level off
# (the larger `λ`, the later), so a few far points no longer dominate the comparison. The colour-transfer
# app offers the same trade as `--method unbalanced` (notebook 3).
#
# ## What next
#
# - `python benchmarks/bench_mw2.py` times MW2 (forward and backward) against POT and checks the values.
# - MW2 between *fitted* mixtures, with the gradient flowing through EM into the data, is the loss of every
#   app: notebook 3 (colours), 4 (textures), 6 (barycentres), 9 (how the gradient through EM is computed).
# - `python -m apps.barycenter` runs the barycentre flow of notebook 6 at full size.
