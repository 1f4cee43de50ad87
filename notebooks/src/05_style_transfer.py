# %% [markdown]
# # 5 · Style transfer with Mixture-Wasserstein losses
#
# Paint a photo in the style of another image. `imgmw.style_transfer(content, style)` describes the style
# by a few small Gaussian mixtures of image features (one per layer), then optimises the pixels of the
# content image so that the mixtures of *its* features move towards the style's in MW2:
#
# `L(x) = Σ_ℓ MW2²(EM_K(F_ℓ(x)), ν_ℓ) / d_ℓ²`, one warm-started EM step per layer per iteration.
#
# The features here are 3×3 pixel patches at three pyramid levels (`features="patches"`), which need no
# network weights. With torchvision's VGG-19 ImageNet weights on disk, `features="vgg19"` (or `"auto"`) uses
# the paper's deep features instead; nothing is ever downloaded unless asked for.
#
# You will see a transfer and its per-layer losses, the style stored as a small model and reused on another
# photo, and what the step size and the content weight change.
#
# **Run time:** about a minute on a 2-core CPU.

# %%
import os
import tempfile

import matplotlib.pyplot as plt
import numpy as np
import torch

import imgmw
from imgmw.image import resize_max
from imgmw.metrics import luminance_ssim, patch_sliced_w2
from imgmw.style import StyleModel, make_extractor, style_distances

from walkthrough import rgb, show

SMALL = os.environ.get("IMGMW_NB_SMALL") == "1"  # the test suite's switch: smaller sizes everywhere
torch.manual_seed(0)
torch.set_num_threads(1)  # small problems: on a shared 2-core machine a second thread mostly waits
plt.rcParams.update({"figure.dpi": 72, "axes.titlesize": 10})


SIDE = 96 if SMALL else 256   # longest side of the content image
ITERS = 10 if SMALL else 100  # Adam steps (the paper's 100)


def gallery(images, titles, suptitle, width=3.2):
    fig, axes = plt.subplots(1, len(images), figsize=(width * len(images), width * 0.85))
    for ax, img, title in zip(axes, images, titles):
        ax.imshow(rgb(img))
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(suptitle)
    fig.tight_layout()
    show(fig, photo=True)


content = resize_max(imgmw.load_image("../data/chelsea.jpg"), SIDE)
wood = imgmw.load_image("../data/wood.png")
print("content", tuple(content.shape), " style", tuple(wood.shape))

# %% [markdown]
# ## 1. A transfer
#
# Chelsea the cat in the style of the wood grain of notebook 4. The pixels start at the content image and
# take `ITERS` Adam steps (step 0.01, the paper's); with no content term, the start is what keeps the cat.

# %%
result = imgmw.style_transfer(content, wood, features="patches", n_iter=ITERS,
                              generator=torch.Generator().manual_seed(0))
print(f"{ITERS} steps in {result.seconds:.1f} s (+ {result.setup_seconds:.1f} s to fit the style mixtures)")
print(f"patch SW2 to the style: content {patch_sliced_w2(content, wood):.3f} -> result "
      f"{patch_sliced_w2(result.image, wood):.3f};  luminance SSIM to the content: "
      f"{luminance_ssim(result.image, content):.2f}")
gallery([content, wood, result.image], ["content", "style", f"result ({ITERS} steps)"],
        "style transfer (image panels, no axes)")

# %% [markdown]
# Left: the loss terms during the optimisation (`result.style_losses [T, L]`: MW2² per layer, before its
# weight `1/d²`). Right: a cleaner measurement, `style_distances`, which fits each layer's mixture to
# convergence (instead of the single warm-started EM step of the loss) for the content and for the result.

# %%
extractor = result.extractor
before = style_distances(content, result.model, extractor)
after = style_distances(result.image, result.model, extractor)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
for i, layer in enumerate(result.model.layers):
    ax1.plot(result.style_losses[:, i], label=f"{layer} (d = {result.model.dims[i]})")
ax1.set_yscale("log")
ax1.set_xlabel("Adam step")
ax1.set_ylabel("MW2² (warm-started fit, style)")
ax1.set_title("loss terms per layer")
ax1.legend(fontsize=8)
pos = np.arange(len(before))
ax2.bar(pos - 0.2, before, 0.4, label="content image")
ax2.bar(pos + 0.2, after, 0.4, label="result")
ax2.set_xticks(pos, result.model.layers)
ax2.set_yscale("log")
ax2.set_xlabel("layer (pyramid level of 3×3 patches)")
ax2.set_ylabel("MW2² (converged fit, style)")
ax2.set_title("distance to the style, per layer")
ax2.legend(fontsize=8)
fig.tight_layout()
show(fig)

# %% [markdown]
# ## 2. The style as a small model
#
# The style is nothing but `L` small mixtures (`result.model`, a `StyleModel`): here three mixtures of
# `K = 3` components in 27 dimensions, about 30 KB on disk. Save it once, and paint any other photo with
# it without touching the style image again.

# %%
model = result.model
print("layers", model.layers, " dims", model.dims, " components", [g.n_components for g in model.gmms])
with tempfile.TemporaryDirectory() as tmp:
    path = model.save(os.path.join(tmp, "wood_style.pt"))
    print(f"saved {path.name}: {path.stat().st_size / 1024:.1f} KB")
    loaded = StyleModel.load(path)

astronaut = resize_max(imgmw.load_image("../data/astronaut.jpg"), SIDE)
painted = imgmw.style_transfer(astronaut, loaded, features=make_extractor(**loaded.extractor), n_iter=ITERS,
                               generator=torch.Generator().manual_seed(0))
gallery([astronaut, painted.image], ["another content", "painted with the stored wood style"],
        "reusing a stored style (image panels, no axes)", width=3.6)

# %% [markdown]
# ## 3. Step size and content weight
#
# A style far from the content (the Hubble deep field: coloured dots on black) shows the two knobs. A
# larger step (`lr`) moves further in the same number of steps and washes the content out; the content
# term `content_weight = β` (a relative squared error on the coarsest level, 0 by default) holds the
# coarse layout while the style still changes the texture. Luminance SSIM against the content measures
# how much of the cat is left.

# %%
hubble = imgmw.load_image("../data/hubble.png")
runs = {"lr 0.01": dict(lr=0.01), "lr 0.02": dict(lr=0.02), "lr 0.02, β = 0.01": dict(lr=0.02, content_weight=0.01)}
outs = {name: imgmw.style_transfer(content, hubble, features="patches", n_iter=ITERS,
                                   generator=torch.Generator().manual_seed(0), **kw) for name, kw in runs.items()}
titles = [f"{name}: SSIM {luminance_ssim(o.image, content):.2f}" for name, o in outs.items()]
gallery([hubble, *(o.image for o in outs.values())], ["style", *titles],
        "content in the style of data/hubble.png (image panels, no axes)", width=3.0)

# %% [markdown]
# ## What next
#
# - `python -m apps.style_transfer data/chelsea.jpg data/wood.png` does the same at full size and writes
#   `stylised.png`, `comparison.png`, `style_gmm.pt` (the `StyleModel`) and `metrics.json`; `--features vgg19
#   --weights PATH` uses VGG-19 features, `--restart-every 10` restarts the warm-started fits (more style,
#   less content).
# - `python -m apps.style_transfer CONTENT STYLE --prior outputs/fit_prior/prior.pt` takes the style of a
#   whole image folder (`python -m apps.fit_prior FOLDER`).
