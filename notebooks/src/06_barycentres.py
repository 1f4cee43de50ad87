# %% [markdown]
# # 6 · Barycentres of point clouds, palettes and textures
#
# A barycentre of several distributions `ν_1 … ν_M` with weights `λ` is the distribution closest to all of
# them on average: here it minimises `Σ_i λ_i MW2²(μ, ν_i)`. imgmw reaches it two ways:
#
# - `imgmw.gmm_barycentre(gmms, weights)`: a fixed point on the mixtures' parameters (fast, exact for
#   mixtures);
# - `imgmw.barycentre_flow(targets, weights)`: a flow of *points* whose warm-started EM fit moves towards the
#   barycentre (the paper's experiment), which also gives samples of it.
#
# Three uses follow: 2-D point clouds, the colour palettes of several photos, and textures (the barycentre
# of patch mixtures, which is how texture mixing works).
#
# **Run time:** about two minutes on a 2-core CPU (three texture syntheses).

# %%
import os

import matplotlib.pyplot as plt
import numpy as np
import torch

import imgmw
from imgmw.barycentre import colour_targets, demo_targets, palette_image, recolour_to_gmm
from imgmw.colour import from_scaled_space
from imgmw.image import resize_max
from imgmw.losses import relative_reg_covar
from imgmw.texture import fit_patch_gmms, synthesize_texture, texture_n_scales

from walkthrough import rgb, show

SMALL = os.environ.get("IMGMW_NB_SMALL") == "1"  # the test suite's switch: smaller sizes everywhere
torch.manual_seed(0)
torch.set_num_threads(1)  # small problems: on a shared 2-core machine a second thread mostly waits
plt.rcParams.update({"figure.dpi": 72, "axes.titlesize": 10})


def ellipse(ax, mean, cov, **kw):
    """Draw the 2-sigma ellipse of a 2-D Gaussian."""
    vals, vecs = np.linalg.eigh(np.asarray(cov, dtype=float))
    t = np.linspace(0, 2 * np.pi, 100)
    circle = np.stack([np.cos(t), np.sin(t)])
    pts = np.asarray(mean, dtype=float)[:, None] + vecs @ (2 * np.sqrt(vals)[:, None] * circle)
    ax.plot(pts[0], pts[1], **kw)


def draw_gmm(ax, g, color, label=None, **kw):
    for k in range(g.n_components):
        ellipse(ax, g.means[k], g.covariances[k], color=color, label=label if k == 0 else None, **kw)

# %% [markdown]
# ## 1. Point clouds
#
# Three 2-component mixtures in the plane (the paper's experiment). 500 points start as standard normal
# noise; every step takes one warm-started EM step on them (fixed uniform weights, like the barycentre) and
# one Wasserstein gradient step on `Σ_i ⅓ MW2²(EM(X), ν_i)`. We pass our own `WarmStartEM` to read the
# final fit of the points afterwards.

# %%
targets = demo_targets()  # three GMMs, float64
iters = 40 if SMALL else 150
em = imgmw.WarmStartEM(2, fixed_weights=True, reg_covar=relative_reg_covar(imgmw.GMM.stack(targets)),
                       n_init_iter=30, generator=torch.Generator().manual_seed(0))
snapshots = {}


def keep(step, energy, x):
    if step + 1 in (5, 20, iters):
        snapshots[step + 1] = x.clone()


points, energy = imgmw.barycentre_flow(targets, n_points=500, n_iter=iters, lr=0.1, em=em, callback=keep,
                                       generator=torch.Generator().manual_seed(0))


def objective(g):
    return sum(float(imgmw.mw2(g, t)) for t in targets) / 3


print(f"objective Σ ⅓ MW2² of the flow's fit: {objective(em.state):.4f}")

# %% [markdown]
# The objective is not convex: it has several local minima, and both methods find *a* local minimum.
# `gmm_barycentre` starts by default from the input with the largest weight (the first one on a tie);
# started from each input in turn, it lands in three different minima. Started from the flow's fit, it does
# not move: the two methods compute the same object when they are in the same basin.

# %%
fixed = {f"from ν{i + 1}": imgmw.gmm_barycentre(targets, init=t) for i, t in enumerate(targets)}
for name, g in fixed.items():
    print(f"gmm_barycentre {name}: objective {objective(g):.4f}")
stay = imgmw.gmm_barycentre(targets, init=em.state)
print(f"gmm_barycentre from the flow's fit: MW2² to where it started {float(imgmw.mw2(stay, em.state)):.1e}")

# %%
start = torch.randn(500, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
fig, axes = plt.subplots(1, 3, figsize=(14, 4.4))
ax = axes[0]
for i, t in enumerate(targets):
    draw_gmm(ax, t, f"C{i}", f"ν{i + 1}")
ax.scatter(points[:, 0], points[:, 1], s=2, c="k", label="flow's points")
draw_gmm(ax, em.state, "k", "their fit", lw=2)
draw_gmm(ax, fixed["from ν1"], "C3", "gmm_barycentre from ν1", lw=1.5, ls="--")
ax.set_title("targets and two local barycentres")
ax.legend(fontsize=8, loc="lower left")
ax = axes[1]
ax.scatter(start[:, 0], start[:, 1], s=2, color="0.7", label="start")
for j, (step, x) in enumerate(snapshots.items()):
    ax.scatter(x[:, 0], x[:, 1], s=2, color=plt.get_cmap("viridis")(j / 2), label=f"step {step}")
ax.set_title("the points along the flow")
ax.legend(fontsize=8, markerscale=4, loc="lower left")
for ax in axes[:2]:
    ax.set_aspect("equal")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
axes[2].plot(energy, "k", label="flow")
for j, (name, g) in enumerate(fixed.items()):
    axes[2].axhline(objective(g), color=f"C{j + 3}", ls="--", label=f"gmm_barycentre {name}")
axes[2].set_yscale("log")
axes[2].set_xlabel("flow step")
axes[2].set_ylabel("Σ ⅓ MW2²(EM fit of the points, ν_i)")
axes[2].set_title("objective along the flow")
axes[2].legend(fontsize=8)
fig.tight_layout()
show(fig)

# %% [markdown]
# ## 2. Colour palettes
#
# The targets are now the 10-component colour mixtures of three photos (in Lab, scaled to order 1), and the
# barycentre's 1000 points are colours: the palette "between" the three. The points start from a Gaussian
# with the targets' overall mean and covariance (`init="moments"`), which shortens the flow. Each photo's
# own palette is shown under it as 1000 of its pixels sorted by luminance; the right column shows the
# barycentric palette and the coffee photo recoloured to it with the colour-transfer flow of notebook 3.

# %%
side = 96 if SMALL else 256
names = ["coffee.jpg", "rocket.jpg", "chelsea.jpg"]
photos = [resize_max(imgmw.load_image(f"../data/{n}"), side) for n in names]
palettes_in = colour_targets(photos, n_components=10, generator=torch.Generator().manual_seed(0))
em_palette = imgmw.WarmStartEM(10, fixed_weights=True, reg_covar=relative_reg_covar(imgmw.GMM.stack(palettes_in)),
                               n_init_iter=30, generator=torch.Generator().manual_seed(0))
colours, history = imgmw.barycentre_flow(palettes_in, n_points=1000, n_iter=40 if SMALL else 150, lr=0.05,
                                         init="moments", em=em_palette, generator=torch.Generator().manual_seed(0))
bary_rgb = from_scaled_space(colours, "lab")  # scaled Lab -> sRGB in [0, 1]
recoloured, _ = recolour_to_gmm(photos[0], em_palette.state, n_iter=30 if SMALL else 100,
                                generator=torch.Generator().manual_seed(0))
print(f"objective: {history[0]:.3f} at the start -> {history[-1]:.4f} after {len(history)} steps")


def pixel_sample(img, n=1000):
    pix = img.flatten(1).T
    return pix[torch.randperm(pix.shape[0], generator=torch.Generator().manual_seed(0))[:n]]


fig, axes = plt.subplots(2, 4, figsize=(13, 5.2))
for j, (photo, name) in enumerate(zip(photos, names)):
    axes[0, j].imshow(rgb(photo))
    axes[0, j].set_title(name)
    axes[1, j].imshow(rgb(palette_image(pixel_sample(photo), columns=40, cell=4)))
    axes[1, j].set_title(f"palette of {name}")
axes[0, 3].imshow(rgb(recoloured))
axes[0, 3].set_title("coffee recoloured to the barycentre")
axes[1, 3].imshow(rgb(palette_image(bary_rgb, columns=40, cell=4)))
axes[1, 3].set_title("barycentric palette (1000 points)")
for ax in axes.flat:
    ax.axis("off")
fig.suptitle("palette barycentre of three photos (image panels and swatches, no axes)")
fig.tight_layout()
show(fig, photo=True)

# %% [markdown]
# ## 3. Textures
#
# A texture is described by one patch mixture per pyramid level (notebook 4). The barycentre of two
# textures' mixtures, level by level, describes a texture between them. First the mixtures alone: for
# weights `(1 − t, t)`, the MW2² from the barycentre to each end. Along a Wasserstein geodesic the distance
# to the first end grows like `t²·MW2²(a, b)` and to the other shrinks like `(1 − t)²·MW2²(a, b)`; the
# barycentres follow both closely.
#
# Everything in this section is float64: the barycentre of 48-dimensional covariances converges much faster
# in double precision.

# %%
size = 48 if SMALL else 128
stripes = resize_max(imgmw.load_image("../data/stripes.png"), 64 if SMALL else 128).double()
veins = resize_max(imgmw.load_image("../data/veins.png"), 64 if SMALL else 128).double()
n_scales = texture_n_scales(tuple(stripes.shape[-2:]), (size, size), 4)
fits_a = fit_patch_gmms(stripes, 4, 4, n_scales, generator=torch.Generator().manual_seed(0))
fits_b = fit_patch_gmms(veins, 4, 4, n_scales, generator=torch.Generator().manual_seed(0))
ts = np.linspace(0, 1, 5 if SMALL else 9)
path = {float(t): [imgmw.gmm_barycentre([a, b], [1 - t, t]) for a, b in zip(fits_a, fits_b)] for t in ts}
to_a = [float(imgmw.mw2(path[float(t)][0], fits_a[0])) for t in ts]
to_b = [float(imgmw.mw2(path[float(t)][0], fits_b[0])) for t in ts]
ab = float(imgmw.mw2(fits_a[0], fits_b[0]))

fig, ax = plt.subplots(figsize=(6.5, 3.4))
ax.plot(ts, to_a, "o-", label="MW2²(barycentre, stripes)")
ax.plot(ts, to_b, "o-", label="MW2²(barycentre, veins)")
ax.plot(ts, ts ** 2 * ab, "k:", lw=1, label="t²·MW2²(stripes, veins)")
ax.plot(ts, (1 - ts) ** 2 * ab, "k--", lw=1, label="(1 − t)²·MW2²(stripes, veins)")
ax.set_xlabel("weight t of the veins")
ax.set_ylabel("MW2² at the finest level")
ax.set_title("barycentres of two textures' patch mixtures")
ax.legend(fontsize=8)
fig.tight_layout()
show(fig)

# %% [markdown]
# Then syntheses that target these barycentres: `synthesize_texture(..., targets=[ν_0, …, ν_{S−1}])` takes
# given per-level mixtures (the exemplar passed with them only sets the noise start). This is what
# `synthesize_texture([stripes, veins], mix=[1 − t, t])` does in one call.

# %%
shown_t = [0.5] if SMALL else [0.25, 0.5, 0.75]
syntheses = []
for t in shown_t:
    start_from = stripes if t <= 0.5 else veins
    out = synthesize_texture(start_from, (size, size), targets=path[t], n_iter=15 if SMALL else 150, diagnose=False,
                             generator=torch.Generator().manual_seed(0))
    syntheses.append(out.image)
images = [stripes, *syntheses, veins]
titles = ["stripes (t = 0)", *[f"t = {t}" for t in shown_t], "veins (t = 1)"]
fig, axes = plt.subplots(1, len(images), figsize=(2.8 * len(images), 3.1))
for ax, img, title in zip(axes, images, titles):
    ax.imshow(rgb(img.float()), interpolation="nearest")
    ax.set_title(title)
    ax.axis("off")
fig.suptitle("syntheses from the barycentres, weights (1 − t, t) (image panels, no axes)")
fig.tight_layout()
show(fig, photo=True)

# %% [markdown]
# ## What next
#
# - `python -m apps.barycenter` (the 2-D experiment) and
#   `python -m apps.barycenter --mode palette data/coffee.jpg data/rocket.jpg data/chelsea.jpg --recolor
#   data/coffee.jpg` (palettes; `--weights` for unequal weights).
# - `python -m apps.texture_synth data/stripes.png data/veins.png --mix 0.3 0.7` mixes textures at full size.
