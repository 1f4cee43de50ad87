# %% [markdown]
# # 7 · Generative models trained with MW2
#
# Instead of optimising one image (notebooks 3–5), train a *network* whose outputs match a data
# distribution. The loss is the same: MW2² between an EM fit of the network's outputs and a fixed target
# mixture, with one warm-started EM step per training step, and its gradient flows through EM into the
# network's weights.
#
# Two generators:
#
# 1. a convolutional **texture generator** (noise images at several resolutions → a texture of any size in
#    one forward pass), trained against the multi-scale patch mixtures of an exemplar (`PatchMW2Loss`,
#    notebook 4);
# 2. an MLP **digits generator** (16 random numbers → an 8×8 digit), trained against one 16-component
#    mixture fitted to scikit-learn's bundled digits, and scored by a classifier.
#
# **Run time:** two to three minutes on a 2-core CPU, most of it training.

# %%
import os
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

import imgmw
from imgmw.generative import (MW2GeneratorTrainer, digit_classifier_scores, generated_sliced_w2, load_samples,
                              make_generator, sample_grid)
from imgmw.metrics import patch_sliced_w2
from imgmw.texture import PatchMW2Loss
from imgmw.texture_net import TextureGenerator, TextureGeneratorTrainer

from walkthrough import rgb, show

SMALL = os.environ.get("IMGMW_NB_SMALL") == "1"  # the test suite's switch: smaller sizes everywhere
torch.manual_seed(0)
torch.set_num_threads(1)  # small problems: on a shared 2-core machine a second thread mostly waits
plt.rcParams.update({"figure.dpi": 72, "axes.titlesize": 10})


def moving_mean(values, window):
    values = np.asarray(values)
    return np.convolve(np.pad(values, (window - 1, 0), mode="edge"), np.ones(window) / window, mode="valid")

# %% [markdown]
# ## 1. A texture generator
#
# `TextureGenerator` turns noise images at 5 resolutions into an RGB image: the coarsest noise goes through a
# small convolution block, is upsampled and merged with the next finer noise, and so on (the design of
# Ulyanov et al.'s texture networks). Being fully convolutional, it produces any size.
#
# Training: every step samples one texture at the training size, and `PatchMW2Loss` compares the patch
# mixtures of its pyramid with the exemplar's (4×4 patches, 4 components per level); Adam updates the
# weights, with a step decaying linearly.

# %%
wood = imgmw.load_image("../data/wood.png")
train_size = 32 if SMALL else 64
tex_steps = 10 if SMALL else 400
loss = PatchMW2Loss(wood, patch=4, n_components=4, n_scales=2 if SMALL else 3,
                    generator=torch.Generator().manual_seed(0))
torch.manual_seed(0)  # the network's initial weights
net = TextureGenerator(channels=8, noise_channels=3)
untrained = net.sample(1, (128, 128), torch.Generator().manual_seed(1))[0]
trainer = TextureGeneratorTrainer(net, loss, size=(train_size, train_size), lr=2e-3, seed=0, total_steps=tex_steps)
t0 = time.perf_counter()
trainer.train(tex_steps)
print(f"{tex_steps} training steps at {train_size}×{train_size} in {time.perf_counter() - t0:.1f} s; "
      f"{sum(p.numel() for p in net.parameters())} weights")

# %% [markdown]
# The training curve: `Σ_s MW2²` of each step's sample (noisy: every step draws new noise and new patches).

# %%
window = max(1, tex_steps // 20)
fig, ax = plt.subplots(figsize=(7, 3.2))
ax.plot(trainer.history, color="0.75", lw=0.6, label="each step")
ax.plot(moving_mean(trainer.history, window), label=f"moving mean ({window} steps)")
ax.set_yscale("log")
ax.set_xlabel("training step")
ax.set_ylabel("Σ_s MW2² (patch mixtures)")
ax.set_title("texture generator: training loss")
ax.legend(fontsize=8)
fig.tight_layout()
show(fig)

# %% [markdown]
# Samples: new noise gives new textures, at any size, in one forward pass. Patch SW2 (lower is closer to
# the exemplar) of a 128×128 sample before and after training:

# %%
samples = net.sample(2, (128, 128), torch.Generator().manual_seed(1))
strip = net.sample(1, (64, 256), torch.Generator().manual_seed(2))[0]
t0 = time.perf_counter()
net.sample(1, (512, 512), torch.Generator().manual_seed(3))
t512 = time.perf_counter() - t0
print(f"patch SW2 to the exemplar: untrained {patch_sliced_w2(untrained, wood):.4f} -> trained "
      f"{patch_sliced_w2(samples[0], wood):.4f}; one 512×512 sample takes {t512:.2f} s")
fig = plt.figure(figsize=(14, 3.2))
panels = [(wood, "exemplar"), (untrained, "untrained network"), (samples[0], "trained: sample 1"),
          (samples[1], "trained: sample 2")]
for j, (img, title) in enumerate(panels):
    ax = fig.add_subplot(1, 6, j + 1)
    ax.imshow(rgb(img))
    ax.set_title(title)
    ax.axis("off")
ax = fig.add_subplot(1, 3, 3)
ax.imshow(rgb(strip))
ax.set_title("trained: a 256×64 sample")
ax.axis("off")
fig.suptitle("texture generator (image panels, no axes)")
fig.tight_layout()
show(fig, photo=True)

# %% [markdown]
# ## 2. A digits generator
#
# The data: scikit-learn's 1797 bundled 8×8 digits, scaled to [0, 1] (`D = 64`), split into training and
# held-out digits. The generator: an MLP from 16 standard normal numbers to 64 pixels (sigmoid output).
# `MW2GeneratorTrainer(target="data")` fits **one** 16-component mixture to the whole training set, then at
# every step generates a batch of 2048 digits, takes one warm-started EM step on them and one Adam step on
# MW2² to that mixture.

# %%
data = load_samples("digits", seed=0)
digit_steps = 10 if SMALL else 400
net_d = make_generator(16, 64, 256, seed=0, output="sigmoid")
trainer_d = MW2GeneratorTrainer(net_d, data.train, z_dim=16, n_components=16, batch=256 if SMALL else 2048, lr=2e-3,
                                target="data", seed=0)
before = trainer_d.sample(1000, seed=1)
t0 = time.perf_counter()
trainer_d.train(digit_steps)
print(f"{data.train.shape[0]} training and {data.test.shape[0]} held-out digits; {digit_steps} steps in "
      f"{time.perf_counter() - t0:.1f} s")

# %% [markdown]
# Scores, untrained and trained: a logistic regression trained on the real training digits says how
# recognisable the generated digits are (mean probability of its top class) and how varied (the entropy of
# the predicted classes over log 10: 1 when all ten digits are equally frequent); the sliced W2 distance to
# the held-out digits says how close the distribution is (two real samples give the floor).

# %%
after = trainer_d.sample(1000, seed=1)
m = data.test.shape[0]
real_floor = generated_sliced_w2(data.train[:m], data.test)
rows = {}
for name, s in (("untrained", before), ("trained", after)):
    c = digit_classifier_scores(s)
    rows[name] = (c["mean_max_probability"], c["entropy_ratio"], generated_sliced_w2(s[:m], data.test))
print(f"{'':<22}{'confidence':>11}{'entropy':>9}{'sliced W2':>11}")
for name, (conf, ent, sw) in rows.items():
    print(f"{name + ' generator':<22}{conf:>11.3f}{ent:>9.3f}{sw:>11.4f}")
print(f"{'real held-out digits':<22}{c['real_held_out_mean_max_probability']:>11.3f}"
      f"{c['real_held_out_entropy_ratio']:>9.3f}{real_floor:>11.4f}")

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.4))
ax1.plot(trainer_d.history, color="0.75", lw=0.6, label="each step")
ax1.plot(moving_mean(trainer_d.history, max(1, digit_steps // 20)), label="moving mean")
ax1.set_yscale("log")
ax1.set_xlabel("training step")
ax1.set_ylabel("MW2²(fit of generated digits, data fit)")
ax1.set_title("digits generator: training loss")
ax1.legend(fontsize=8)
grid = torch.cat([sample_grid(data.test[:40], (1, 8, 8), columns=8, scale=3),
                  torch.ones(3, sample_grid(data.test[:40], (1, 8, 8), columns=8, scale=3).shape[1], 12),
                  sample_grid(after[:40], (1, 8, 8), columns=8, scale=3)], dim=2)
ax2.imshow(rgb(grid), interpolation="nearest")
ax2.set_title("held-out real digits (left) | generated digits (right)")
ax2.axis("off")
fig.tight_layout()
show(fig)

# %% [markdown]
# The generated digits are recognisable but grainier than real ones, and the classifier is less sure of
# them; the classes are as varied as the real ones. The texture samples above have the exemplar's colours
# and grain direction but are blurrier than a per-image synthesis (notebook 4): 400 steps at 64×64 is a short
# training (the app's default is 1500 steps at 192×192).
#
# ## What next
#
# - `python -m apps.train_generator --data texture --image data/wood.png` (1500 steps at 192×192, the patch MW2
#   loss plus 1000× the sliced W2² of the pixel colours, `imgmw.colour_loss`, and 5× the semi-dual patch OT of
#   `imgmw.texture_semidual`), then
#   `python -m apps.generate outputs/train_generator/checkpoint.pt --size 512` samples it; `--tileable`
#   trains a generator of seamless tiles.
# - `python -m apps.train_generator --data digits` (600 steps against the 128 components of one fit, plus a
#   sliced-W2 term to the training digits; `apps.generate` samples it at truncation 0.5),
#   `--data gmm2d` (a ring of 8 Gaussians in 2-D), `--data patches`; `--resume` continues a run.
