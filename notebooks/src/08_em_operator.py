# %% [markdown]
# # 8 · EM as a neural operator: `EMLayer`
#
# EM maps a *set* of points to a Gaussian mixture. Seen as a neural operator it has three parts:
#
# - an **encoder** (a transform of the data into a latent description): the E-step, the responsibilities
#   `r_nk ∝ w_k N(x_n | m_k, Σ_k)`, summarised into per-component sufficient statistics;
# - an **operator core** acting in that latent space: `T` EM steps `θ ← F(θ, X)`;
# - a **decoder** back to the data: the mixture's log-density `log p(x) = logsumexp_k (log w_k + log N(x | m_k, Σ_k))`.
#
# `imgmw.EMLayer` is this operator with learnable parts: after each EM step a small permutation-equivariant
# network corrects the means, Cholesky factors and weights, within bounds that keep every covariance
# symmetric positive definite. Its last layers start at zero, so an untrained layer *is* plain EM. Trained
# to maximise the likelihood on random mixtures, it gets more out of the same `T` steps.
#
# This notebook puts the three parts in code, checks the identity at initialisation, trains a layer and
# compares it with plain EM on held-out sets.
#
# **Run time:** about a minute on a 2-core CPU, most of it training.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np
import torch

import imgmw
from imgmw.init import init_gmm
from imgmw.layer_training import LayerTrainer, evaluate, random_mixtures

from walkthrough import show

SMALL = os.environ.get("IMGMW_NB_SMALL") == "1"  # the test suite's switch: smaller sizes everywhere
torch.manual_seed(0)
torch.set_num_threads(1)  # small problems: on a shared 2-core machine a second thread mostly waits
plt.rcParams.update({"figure.dpi": 72, "axes.titlesize": 10})


K, D, N, T = 4, 2, 256, 3  # components, dimension, points per set, unrolled EM steps

# %% [markdown]
# ## 1. Encoder, operator, decoder
#
# A batch of 8 random 4-component mixtures in 2-D, 256 points each, and a seeded k-means++ start for every
# set (`init_gmm`). The three parts, written with imgmw's public functions:

# %%
gen = torch.Generator().manual_seed(0)
x, _ = random_mixtures(8, K, D, gen).sample(N, generator=gen)  # [8, 256, 2]
start = init_gmm(x, K, "kmeans++", generator=gen)  # batch [8]

log_resp, log_p = imgmw.e_step(start, x)  # encoder: log-responsibilities [8, N, K] (and log p(x_n))
gmm, trajectory = start, [start.means]
for _ in range(T):  # operator core: T EM steps
    gmm = imgmw.em_step(gmm, x)
    trajectory.append(gmm.means)
log_likelihood = gmm.log_prob(x).sum(-1)  # decoder: Σ_n log p(x_n) per set, [8]
print("responsibilities", tuple(log_resp.shape), " log-likelihood per point:",
      (log_likelihood / N).numpy().round(3))

# %% [markdown]
# For the first set: the encoder's responsibilities at the start (each point coloured by its most likely
# component, paler where it is shared), the operator moving the means over the `T` steps (and where plain EM
# would be after 10·T), and the decoder's log-density after `T` steps.

# %%
i = 0
far = imgmw.fit_gmm(x[i], K, n_iter=10 * T, init=start[i], grad="none").gmm
fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), sharex=True, sharey=True)
resp = log_resp[i].exp()
colours = plt.get_cmap("tab10")(resp.argmax(-1).numpy())
colours[:, 3] = resp.max(-1).values.numpy() ** 2
axes[0].scatter(x[i, :, 0], x[i, :, 1], c=colours, s=8)
axes[0].set_title("encoder: responsibilities of the start")
axes[1].scatter(x[i, :, 0], x[i, :, 1], s=3, color="0.7")
path = torch.stack([m[i] for m in trajectory]).numpy()  # [T + 1, K, D]
for k in range(K):
    axes[1].plot(path[:, k, 0], path[:, k, 1], "o-", color=f"C{k}", ms=4)
axes[1].scatter(far.means[:, 0], far.means[:, 1], marker="*", s=150, color="k", label=f"plain EM, {10 * T} steps")
axes[1].set_title(f"operator: the means over {T} EM steps")
axes[1].legend(fontsize=8)
g1, g2 = np.meshgrid(np.linspace(float(x[i, :, 0].min()) - 1, float(x[i, :, 0].max()) + 1, 120),
                     np.linspace(float(x[i, :, 1].min()) - 1, float(x[i, :, 1].max()) + 1, 120))
grid = torch.tensor(np.stack([g1.ravel(), g2.ravel()], -1), dtype=x.dtype)
density = gmm[i].log_prob(grid).reshape(g1.shape).numpy()
cs = axes[2].contourf(g1, g2, density, levels=np.linspace(density.max() - 10, density.max(), 11), cmap="viridis",
                      extend="min")
axes[2].scatter(x[i, :, 0], x[i, :, 1], s=2, color="w")
fig.colorbar(cs, ax=axes[2], label="log p(x)")
axes[2].set_title(f"decoder: log-density after {T} steps")
for ax in axes:
    ax.set_xlabel("$x_1$")
axes[0].set_ylabel("$x_2$")
fig.tight_layout()
show(fig)

# %% [markdown]
# ## 2. The layer, and its identity at initialisation
#
# `EMLayer(K, D, n_iter=T)` does the same in one module: `layer(x, init=start)` returns the mixture, the
# log-responsibilities under it and the log-likelihood of each set (the decoder). Untrained, it is exactly `T`
# EM steps: compared in float64 with `fit_gmm` from the same start, the difference is rounding error.

# %%
layer64 = imgmw.EMLayer(K, D, n_iter=T, init="given").double()
with torch.no_grad():
    out64, _, ll64 = layer64(x.double(), init=start.to(torch.float64))
ref64 = imgmw.fit_gmm(x.double(), K, n_iter=T, init=start.to(torch.float64), grad="none").gmm
print(f"untrained layer vs {T} EM steps: largest difference of a mean "
      f"{float((out64.means - ref64.means).abs().max()):.1e}, of a covariance "
      f"{float((out64.covariances - ref64.covariances).abs().max()):.1e}")
print("trainable parameters:", sum(p.numel() for p in layer64.parameters()))

# %% [markdown]
# ## 3. Training
#
# Every step draws 32 fresh random mixtures, samples 256 points from each, starts every set from k-means++ and
# takes one Adam step on the negative log-likelihood per point of the layer's mixtures
# (`nll_loss(log_likelihood, n_points=N)`), with a cosine-decayed step size and clipped gradients. `LayerTrainer`
# packages that loop; one step of it is, in substance:
#
# ```python
# x, start = sets_with_starts(32, K, D, N, generator)
# loss = nll_loss(layer(x, init=start)[2], n_points=N)
# optimizer.zero_grad(); loss.backward(); clip_grad_norm_(layer.parameters(), 1.0); optimizer.step()
# ```
#
# It also records plain EM's loss on the same batch, because the loss itself is noisy (some sets are
# harder to fit than others) while the *gain* over plain EM is not.

# %%
steps = 15 if SMALL else 400
torch.manual_seed(0)  # the correction networks' initial weights
layer = imgmw.EMLayer(K, D, n_iter=T, init="given")
trainer = LayerTrainer(layer, n_points=N, batch=32, lr=1e-2, total_steps=steps, seed=0)
before = evaluate(layer, n_points=N, n_sets=64 if SMALL else 256)
trainer.train(steps)
table = evaluate(layer, n_points=N, n_sets=64 if SMALL else 256)
print(f"{steps} steps; gain over plain EM on the last 50 training batches: {trainer.recent_gain():+.4f} nats/point")


def moving_mean(values, window):
    values = np.asarray(values)
    return np.convolve(np.pad(values, (window - 1, 0), mode="edge"), np.ones(window) / window, mode="valid")


window = max(1, steps // 20)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.6))
ax1.plot(trainer.history, color="0.75", lw=0.6, label="loss of each batch")
ax1.plot(moving_mean(trainer.history, window), label=f"moving mean ({window} steps)")
ax1.set_xlabel("training step")
ax1.set_ylabel("negative log-likelihood per point")
ax1.set_title("training loss")
ax1.legend(fontsize=8)
gain = np.asarray(trainer.em_history) - np.asarray(trainer.history)
ax2.plot(moving_mean(gain, window), label=f"training batches (moving mean, {window})")
ax2.axhline(table["layer_T"] - table["em_T"], color="C0", ls="--", label=f"held-out: trained layer, T={T}")
ax2.axhline(table["em_10T"] - table["em_T"], color="C2", ls="--", label=f"held-out: plain EM, T={10 * T}")
ax2.axhline(0, color="C3", ls=":", label=f"plain EM, T={T}")
ax2.set_xlabel("training step")
ax2.set_ylabel(f"log-likelihood per point over EM, T={T}")
ax2.set_title("gain over plain EM with the same start")
ax2.legend(fontsize=8)
fig.tight_layout()
show(fig)

# %% [markdown]
# ## 4. The comparison table
#
# Held-out sets (a fixed seed, never seen in training), every row from the same k-means++ start per set;
# mean log-likelihood per point, higher is better. "Gap closed" is how much of the way from plain EM with
# `T` steps to plain EM with `10·T` steps the trained layer covers with `T`.

# %%
rows = [(f"plain EM, T = {T}", table["em_T"]), (f"EMLayer untrained, T = {T}", before["layer_T"]),
        (f"EMLayer trained, T = {T}", table["layer_T"]), (f"plain EM, T = {10 * T}", table["em_10T"])]
print(f"{'held-out sets':<28}{'log-lik / point':>16}")
for name, value in rows:
    print(f"{name:<28}{value:>16.4f}")
print(f"{'gap closed by training':<28}{100 * table['gap_closed']:>15.1f}%")

fig, ax = plt.subplots(figsize=(7, 2.8))
names, values = zip(*rows)
ax.barh(names, values, color=["C3", "C1", "C0", "C2"])
ax.set_xlim(min(values) - 0.02, max(values) + 0.01)
ax.invert_yaxis()
ax.set_xlabel("held-out mean log-likelihood per point")
ax.set_ylabel("method")
ax.set_title(f"trained for {steps} steps: {100 * table['gap_closed']:.0f}% of the gap closed")
fig.tight_layout()
show(fig)

# %% [markdown]
# ## What next
#
# - `python -m apps.em_operator` trains for 1000 steps (the README's table: 66 % of the gap closed) and
#   writes `checkpoint.pt`, `loss.png` and `metrics.json`; `--dim 4`, `--iters 5`, `--resume` and the other
#   flags are in `--help`.
# - `EMLayer` is an `nn.Module`: its output mixture can feed any loss, e.g. `imgmw.mw2` to a target, and
#   gradients flow back to the points and to the layer's weights (notebook 9 is about gradients through EM).
