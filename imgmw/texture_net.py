"""A feed-forward texture generator trained with the multi-scale patch MW2 loss.

The network follows the multi-scale design of Ulyanov et al.'s texture networks (2016): noise images
``z_s [n, c_z, H/2^s, W/2^s]`` at ``S`` resolutions; the coarsest goes through a convolution block, is upsampled
(nearest, ×2) and concatenated with the block output of the next finer noise, and so on up to full resolution,
where a 1×1 convolution and a sigmoid give the RGB image in [0, 1]. A block is two 3×3 convolutions, each
followed by instance normalisation and LeakyReLU(0.2); channel counts grow towards the fine scales. Being fully
convolutional, one network samples any size in one forward pass (sides are rounded up to a multiple of
``2^(S−1)``, at least twice that, and the result is cropped). With ``periodic=True`` every convolution pads
circularly and nothing is cropped, so the samples tile (sides must be multiples of ``2^(S−1)``, at least twice it).

Instance normalisation (Ulyanov et al. normalise every block too, with batch statistics) is what makes the
network train: measured on ``data/wood.png`` (1000 steps, Adam 5e-3, one thread), the training loss fell to 0.087
with it and 0.150 without, and a 256² sample's 4×4 patch sliced-W2 to 0.0095 against 0.0132 (``texture_synth``:
0.0074); on ``data/brick.png`` 0.0097 (synth 0.0074). Adam's step: 5e-3 gave 0.0095, 1e-2 0.0106 (and 2e-3,
without normalisation, 0.0140 against 0.0132 at 5e-3). Without normalisation, training on 256² samples instead
of 128² scored worse at equal CPU time (0.0152 against 0.0132: fewer steps). With normalisation the training
size pays: on ``data/bricks.png`` (1500 steps, one thread, mean of 256² samples of noise seeds 1–3, patch
sliced-W2 / structure distance) 128² training scored 0.0236 / 0.0728, 192² 0.0211 / 0.0645 (1.4× the CPU time),
256² 0.0208 / 0.0649 (2×); eight components per scale instead of four gave 0.0222 / 0.0671 at 128² and
0.0195 / 0.0557 at 192², but in the app's runs at 192² they scored worse on ``data/gravel.png`` and
``data/wood.png`` (patch sliced-W2 0.0076 and 0.0095, against 0.0055 and 0.0081 for the earlier default), so
``apps.train_generator --data texture`` trains 1500 steps at 192² with four components and one sample per step
(about 320 s on one thread, against 410 s for the earlier 3000 steps at 128²; the README has the scores on all
seven bundled exemplars). Two samples per step (``--batch 2``: two fits, their losses
averaged), in the app's runs on all seven (patch sliced-W2 / structure distance, seeds 1–3, against one sample):
wood 0.0079 / 0.0653 (0.0079 / 0.0663), brick 0.0101 / 0.0545 (0.0084 / 0.0477), gravel 0.0053 / 0.1314
(0.0058 / 0.1310), hubble 0.0178 / 0.0357 (0.0184 / 0.0375), bricks 0.0190 / 0.0654 (0.0209 / 0.0665),
stripes 0.0425 / 0.1000 (0.0455 / 0.0971), veins 0.0113 / 0.0507 (0.0130 / 0.0530): patch sliced-W2 3–13 %
lower on five, the same on wood and 20 % higher on brick (1.36× texture_synth's), for 1.8× the time (585–645 s on
one thread), so the default stays one.

The app adds ``1000 ×`` the sliced colour W2² (:class:`imgmw.colour_loss.SlicedColourLoss`, 16 directions) to the
MW2 loss. In its runs on all seven (patch sliced-W2 / structure distance, seeds 1–3, against the MW2 loss alone):
wood 0.0080 / 0.0697 (0.0079 / 0.0663), brick 0.0052 / 0.0450 (0.0084 / 0.0477), gravel 0.0045 / 0.1342
(0.0058 / 0.1310), hubble 0.0152 / 0.0383 (0.0184 / 0.0375), bricks 0.0152 / 0.0819 (0.0209 / 0.0665), stripes
0.0252 / 0.0867 (0.0455 / 0.0971), veins 0.0089 / 0.0551 (0.0130 / 0.0530), in 421–497 s on one thread (321–384 s):
every patch sliced-W2 but wood's fell, and all seven were within 1.2× of ``texture_synth``'s result of the time
(before its semi-dual finish) on both scores except the stripes' structure (1.69×). Against ``texture_synth``'s
current default, which has the finish, only gravel was; with the semi-dual term below all seven are on the app's
sample and six of seven on the mean over noise seeds 1–8, not hubble (README).

The app also adds ``5 ×`` the multi-scale patch semi-dual OT of :mod:`imgmw.texture_semidual` (4 scales of 4×4
patches, 2000 exemplar patches per scale, Houdard et al.'s texture-network loss; ``texture_synth`` finishes its
synthesis with it): the duals ``ψ_s`` share the sample's patches out evenly over the exemplar patches, and the
image term pulls each patch towards its ψ-shifted nearest exemplar patch, which keeps the long, thin structures
(mortar lines, bands) that four Gaussians per scale blur. Its duals carry over from step to step and each step
sees a fresh sample, so the trainer takes two ascent steps and 2048 patches per scale and step
(``SEMIDUAL_PSI_STEPS``, ``SEMIDUAL_IMAGE_PATCHES``; an image optimisation takes 10 and 4096): over the first 10
steps on ``data/bricks.png`` (one thread) a step took 0.64 s, against 0.99 s with 10 and 4096 and 0.34 s without
the term (the quality of 10 and 4096 in training was not measured). Measured with a scratch script
(600 steps at 192², one thread, patch sliced-W2 / structure distance, mean of seeds 1–3; the term's weight):
bricks 0.0166 / 0.0857 without it, 0.0142 / 0.0717 at 1, 0.0139 / 0.0477 at 5, 0.0142 / 0.0439 at 20,
0.0151 / 0.0421 at 50 (thin mortar lines instead of rounded runs); hubble 0.0132 / 0.0397 without,
0.0145 / 0.0345 at 5, 0.0211 / 0.0317 at 10, 0.0227 / 0.0298 at 20 (the bright objects fade into blotches); stripes
0.0221 / 0.0600 at 10 and 0.0209 / 0.0602 at 20 (bands instead of the blotches of the README); so the default
is 5. The app's default runs on the seven bundled exemplars took 635–868 s on one thread, two at a time, against
421–497 s without the term (README). Under ``torchrun`` the app gives the term the run's process group: the ψ
ascent counts every process's patches, so all processes hold the same duals (and a checkpoint's are every
rank's).

Sampling (:meth:`TextureGenerator.sample`) runs without autograd on channels-last tensors: a 512² sample of the
default network takes 0.36 s of CPU time on one thread, against 0.55 s for the autograd path's forward
(measured min of 5 after a warm-up, process CPU time, on a machine shared with other jobs). A grey exemplar
(three equal channels, :func:`imgmw.image.is_grey`) gets a one-channel network (``out_channels=1``) whose output
is repeated over the three channels, as :func:`imgmw.texture.synthesize_texture` optimises one channel for grey
exemplars: an RGB network trained on ``data/brick.png`` left green specks on the mortar joints.

Training (:class:`TextureGeneratorTrainer`) minimises, by Adam over the weights,

    L(θ) = Σ_s MW2²( EM_K(P_s(G_θ(z))), ν_s ) [+ μ·SW_c(G_θ(z))] [+ λ·E(G_θ(z))] [+ η·Σ_s H_s(ψ̄_s, G_θ(z)_s)]

with :class:`imgmw.texture.PatchMW2Loss` (fresh noise ``z`` every step, warm-started EM fits of the generated
patches, the exemplar's per-scale patch mixtures ``ν_s``), at a fixed training size; optionally plus ``μ`` times
the sliced colour W2² ``SW_c`` of :mod:`imgmw.colour_loss`, ``λ`` times the nearest-exemplar-patch energy ``E``
of :mod:`imgmw.patch_energy` and ``η`` times the semi-dual patch OT ``H_s`` of :mod:`imgmw.texture_semidual`.
"""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .colour_loss import SlicedColourLoss
from .distributed import check_process_group, rank
from .flow import StepTrainer, guarded_step
from .patch_energy import NearestPatchEnergy
from .texture import PatchMW2Loss
from .texture_semidual import SemiDualPatchOT
from .validation import check_weight

__all__ = ["TextureGenerator", "TextureGeneratorTrainer", "LR_FLOOR", "SEMIDUAL_PSI_STEPS", "SEMIDUAL_IMAGE_PATCHES"]

# The step size decays linearly to this fraction of its start. Measured on data/wood.png (1500 steps, 8
# channels per scale): patch sliced-W2 of a 256² sample 0.0145 with a constant step, 0.0136 with the decay.
LR_FLOOR = 0.05
# The semi-dual term's settings in training (imgmw.texture_semidual's defaults are 10 and 4096 for an image
# optimisation): its duals carry over from step to step and every step sees a fresh sample, so fewer ascent steps
# and patches per step are taken, at two thirds of the step time (see the module docstring).
SEMIDUAL_PSI_STEPS = 2
SEMIDUAL_IMAGE_PATCHES = 2048


def _norm_act_(x: Tensor, norm: nn.InstanceNorm2d) -> Tensor:
    """Inference-only instance normalisation and LeakyReLU(0.2) of a channels-last ``x [n, c, h, w]``, in fewer
    memory passes than ``F.leaky_relu(norm(x), 0.2)`` (same values up to rounding).

    Each image's pixels, viewed as a ``[h·w, c]`` matrix (a view in channels-last memory), are normalised by
    ``F.batch_norm`` in training mode (statistics over the rows: the instance statistics), then the activation
    runs in place. Returns a channels-last tensor.
    """
    n, c, h, w = x.shape
    rows = [F.batch_norm(x[i].permute(1, 2, 0).reshape(h * w, c), None, None, norm.weight, norm.bias,
                         training=True, eps=norm.eps) for i in range(n)]
    y = (rows[0].unsqueeze(0) if n == 1 else torch.stack(rows)).view(n, h, w, c).permute(0, 3, 1, 2)
    return F.leaky_relu_(y, 0.2)


def _conv_circular(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(x)`` of a 3×3, padding-1 circular convolution for a channels-last ``x [n, c, h, w]``, keeping the
    layout: the wrap-around rows and columns are concatenated on, where ``F.pad(mode="circular")`` (what
    ``padding_mode="circular"`` runs) returns a contiguous tensor; on a ``[1, 24, 512, 512]`` input on one CPU thread
    the padded convolution took 0.103 s that way against 0.057 s this way."""
    x = torch.cat([x[..., -1:, :], x, x[..., :1, :]], dim=-2)
    x = torch.cat([x[..., -1:], x, x[..., :1]], dim=-1)
    return F.conv2d(x, conv.weight)


class _Block(nn.Module):
    """Two 3×3 convolutions, each followed by instance normalisation and LeakyReLU(0.2), reflect or circular
    padding (``[n, c_in, h, w] → [n, c_out, h, w]``).

    Instance normalisation maps every channel of every image to ``γ_c (y − mean) / sqrt(var + ε) + β_c`` with the
    mean and variance over that image's pixels (so the convolutions need no bias). It is the same in training
    and sampling and, over a stationary texture, does not depend on the image size.
    """

    def __init__(self, c_in: int, c_out: int, periodic: bool) -> None:
        super().__init__()
        mode: Literal["circular", "reflect"] = "circular" if periodic else "reflect"
        self.periodic = periodic
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, padding_mode=mode, bias=False)
        self.norm1 = nn.InstanceNorm2d(c_out, affine=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, padding_mode=mode, bias=False)
        self.norm2 = nn.InstanceNorm2d(c_out, affine=True)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():  # sampling: channels-last tensors (see TextureGenerator.forward)
            if self.periodic:
                x = _norm_act_(_conv_circular(self.conv1, x), self.norm1)
                return _norm_act_(_conv_circular(self.conv2, x), self.norm2)
            return _norm_act_(self.conv2(_norm_act_(self.conv1(x), self.norm1)), self.norm2)
        x = F.leaky_relu(self.norm1(self.conv1(x)), 0.2)
        return F.leaky_relu(self.norm2(self.conv2(x)), 0.2)


class TextureGenerator(nn.Module):
    """Multi-scale noise-to-texture network (see the module docstring).

    Args:
        n_scales: noise resolutions ``S``.
        channels: block width at the coarsest scale; each finer scale adds ``channels`` (scale ``s`` from the
            coarsest has ``(s + 1)·channels``, capped at ``max_channels``).
        noise_channels: ``c_z`` of every noise image.
        periodic: circular padding everywhere: samples tile.
        max_channels: width cap of the finest blocks (their cost dominates sampling).
        out_channels: 3 (RGB) or 1 (grey: the network computes one channel and :meth:`forward` repeats it over
            the three, so its samples are exactly grey, as ``apps.texture_synth`` makes grey exemplars).

    Without autograd (``torch.no_grad`` / ``torch.inference_mode``, e.g. :meth:`sample`) the forward pass runs on
    channels-last tensors, whose convolutions take about half the time on the CPU, with the instance
    normalisation computed as a batch normalisation of each image's ``[H·W, c]`` pixel matrix; the result equals
    the autograd path's up to float rounding.
    """

    def __init__(self, n_scales: int = 5, channels: int = 8, noise_channels: int = 3, periodic: bool = False,
                 max_channels: int = 32, out_channels: int = 3) -> None:
        super().__init__()
        for name, value in (("n_scales", n_scales), ("channels", channels), ("noise_channels", noise_channels),
                            ("max_channels", max_channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.n_scales, self.channels, self.noise_channels = n_scales, channels, noise_channels
        if out_channels not in (1, 3):
            raise ValueError(f"out_channels must be 1 (grey) or 3 (RGB), got {out_channels!r}")
        self.periodic, self.max_channels, self.out_channels = bool(periodic), max_channels, out_channels
        self.noise_blocks = nn.ModuleList(_Block(noise_channels, channels, self.periodic) for _ in range(n_scales))
        merged, width = [], channels
        for _ in range(n_scales - 1):
            out = min(width + channels, max_channels)
            merged.append(_Block(width + channels, out, self.periodic))
            width = out
        self.merge_blocks = nn.ModuleList(merged)
        self.to_rgb = nn.Conv2d(width, out_channels, 1)

    def config(self) -> dict[str, Any]:
        """The constructor's arguments (stored in checkpoints)."""
        return {"n_scales": self.n_scales, "channels": self.channels, "noise_channels": self.noise_channels,
                "periodic": self.periodic, "max_channels": self.max_channels, "out_channels": self.out_channels}

    @property
    def multiple(self) -> int:
        """Sides of the full-resolution noise are multiples of this, ``2^(S−1)``."""
        return 2 ** (self.n_scales - 1)

    def noise_shape(self, size: tuple[int, int]) -> tuple[int, int]:
        """Full-resolution noise size for an output ``size = (H, W)``: each side rounded up to a multiple of
        :attr:`multiple` and to at least twice it (the coarsest noise image needs more than one pixel for its
        instance normalisation)."""
        h, w = size
        if min(h, w) < 1:
            raise ValueError(f"size must be positive, got {size}")
        m = self.multiple
        if self.periodic and (h % m or w % m or min(h, w) < 2 * m):
            raise ValueError(f"a tileable sample needs sides divisible by {m} (2^(n_scales-1)) and at least "
                             f"{2 * m}, got {w}x{h}")
        return max(2, math.ceil(h / m)) * m, max(2, math.ceil(w / m)) * m

    def noise(self, n: int, size: tuple[int, int], generator: torch.Generator | None = None,
              device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> list[Tensor]:
        """``S`` standard normal noise images ``[n, c_z, H/2^s, W/2^s]``, finest first, drawn in that order
        from ``generator`` (on the generator's device, then moved to ``device``)."""
        h, w = self.noise_shape(size)
        gdev = generator.device if generator is not None else torch.device("cpu")
        return [torch.randn(n, self.noise_channels, h >> s, w >> s, generator=generator, device=gdev,
                            dtype=dtype).to(device) for s in range(self.n_scales)]

    def forward(self, noise: list[Tensor], size: tuple[int, int] | None = None) -> Tensor:
        """Images ``[n, 3, H, W]`` in [0, 1] from :meth:`noise` (cropped to ``size`` when given); a grey network
        (``out_channels=1``) returns its channel repeated three times (an expanded view)."""
        if len(noise) != self.n_scales:
            raise ValueError(f"expected {self.n_scales} noise images, got {len(noise)}")
        fast = not torch.is_grad_enabled()
        if fast:
            noise = [z.contiguous(memory_format=torch.channels_last) for z in noise]
        x = self.noise_blocks[-1](noise[-1])
        for s in range(self.n_scales - 2, -1, -1):
            up = F.interpolate(x, scale_factor=2, mode="nearest")
            merged = torch.cat([up, self.noise_blocks[s](noise[s])], dim=1)
            x = self.merge_blocks[self.n_scales - 2 - s](merged)
        out = torch.sigmoid(self.to_rgb(x))
        if fast:
            out = out.contiguous()
        if size is not None:
            out = out[..., :size[0], :size[1]]
        return out.expand(-1, 3, -1, -1) if self.out_channels == 1 else out

    @torch.no_grad()
    def sample(self, n: int, size: tuple[int, int], generator: torch.Generator | None = None) -> Tensor:
        """``n`` textures ``[n, 3, H, W]`` of ``size = (H, W)`` in one forward pass (no autograd: the channels-last
        path of :meth:`forward`); grey networks give three equal channels."""
        param = next(self.parameters())
        with torch.inference_mode():
            out = self(self.noise(n, size, generator, param.device, param.dtype), size)
        return out.clone()  # a normal tensor (inference tensors refuse in-place use under autograd)


class TextureGeneratorTrainer(StepTrainer):
    """Adam on a :class:`TextureGenerator`'s weights against a :class:`~imgmw.texture.PatchMW2Loss`.

    Args:
        net: the generator; loss: the patch loss built from the exemplar (its ``periodic`` should match the
            network's); size: ``(H, W)`` of the training samples; batch: samples per step (each its own fit);
        lr: Adam's step size, decayed linearly to ``LR_FLOOR·lr`` over ``total_steps`` (constant for ``None``);
        seed: seeds the noise (``seed + rank`` on each rank of ``process_group``, the group
            of a DistributedDataParallel run whose loss was built with the same group).
        nearest: a :class:`imgmw.patch_energy.NearestPatchEnergy` of the same exemplar, added to the loss with
            weight ``nearest_weight`` (``None``, the default: the MW2 loss alone). Its queries are drawn from its
            own generator; give it the loss's (``loss.generator``) so that the checkpointed state covers both.
        colour: a :class:`imgmw.colour_loss.SlicedColourLoss` of the same exemplar, added with weight
            ``colour_weight`` (``None``, the default: no colour term).
        semidual: a :class:`imgmw.texture_semidual.SemiDualPatchOT` of the same exemplar (its ``periodic`` the
            network's), added with weight ``semidual_weight``: every step first ascends its duals ``ψ_s`` on the
            step's samples (``psi_steps`` steps, no gradient; the duals carry over from step to step), then adds
            ``Σ_s H_s(ψ̄_s, X_s)`` of each sample, averaged over the batch. The checkpointed state covers its
            generator and duals. Under ``process_group`` build it with the same group (shared duals).
    """

    def __init__(self, net: TextureGenerator, loss: PatchMW2Loss, *, size: tuple[int, int] = (128, 128),
                 batch: int = 1, lr: float = 5e-3, seed: int = 0, total_steps: int | None = None,
                 process_group=None, nearest: NearestPatchEnergy | None = None,
                 nearest_weight: float = 1.0, colour: SlicedColourLoss | None = None,
                 colour_weight: float = 1.0, semidual: SemiDualPatchOT | None = None,
                 semidual_weight: float = 1.0) -> None:
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
        self.net, self.loss, self.size, self.batch = net, loss, net.noise_shape(size), batch
        self.nearest, self.nearest_weight = nearest, check_weight("nearest_weight", nearest_weight)
        self.colour, self.colour_weight = colour, check_weight("colour_weight", colour_weight)
        self.semidual, self.semidual_weight = semidual, check_weight("semidual_weight", semidual_weight)
        param = next(net.parameters())
        self.device, self.dtype = param.device, param.dtype
        group = check_process_group(process_group)
        self.rng = torch.Generator(device=self.device).manual_seed(seed + rank(group))
        # under a process group the forward pass runs through DistributedDataParallel (weights broadcast from
        # rank 0, gradients averaged); ``net`` stays the plain module for sampling and checkpoints
        self.model = net if group is None else nn.parallel.DistributedDataParallel(net, process_group=group)
        self.optimizer = torch.optim.Adam(net.parameters(), lr=lr)
        self.lr, self.total_steps = lr, total_steps
        self.step_count = 0
        self.history: list[float] = []

    def step(self) -> float:
        """One step on fresh noise; returns the objective of this step's samples, ``Σ_s MW2²`` plus
        ``nearest_weight ×`` the nearest-patch energy, ``colour_weight ×`` the sliced colour loss and
        ``semidual_weight ×`` the semi-dual term when they are given."""
        self.net.train()
        if self.total_steps:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr * max(LR_FLOOR, 1.0 - self.step_count / self.total_steps)
        image = self.model(self.net.noise(self.batch, self.size, self.rng, self.device, self.dtype))
        objective = self.loss(image)
        if self.nearest is not None and self.nearest_weight > 0:
            objective = objective + self.nearest_weight * self.nearest(image)
        if self.colour is not None and self.colour_weight > 0:
            objective = objective + self.colour_weight * self.colour(image)
        if self.semidual is not None and self.semidual_weight > 0:
            objective = objective + self.semidual_weight * self.semidual.loss(image)
        value = guarded_step(objective, self.optimizer, list(self.net.parameters()), self.history)
        self.step_count += 1
        return value

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: network (and its config), optimiser, the loss's warm starts and generator
        (patch draws, fresh fits), the semi-dual term's duals and generator, the noise generator, history."""
        loss_rng = self.loss.generator
        state: dict[str, Any] = {
            "net": self.net.state_dict(), "config": self.net.config(), "optimizer": self.optimizer.state_dict(),
            "loss": self.loss.state_dict(), "loss_rng": None if loss_rng is None else loss_rng.get_state(),
            "rng": self.rng.get_state(), "step": self.step_count, "history": list(self.history)}
        if self.semidual is not None:
            state["semidual_psi"] = [p.clone() for p in self.semidual.psi]
            state["semidual_psi_avg"] = [p.clone() for p in self.semidual.psi_avg]
            sd_rng = self.semidual.generator
            state["semidual_rng"] = None if sd_rng is None else sd_rng.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loss.load_state_dict(state["loss"])
        if self.loss.generator is not None and state["loss_rng"] is not None:
            self.loss.generator.set_state(state["loss_rng"])
        if self.semidual is not None:
            if "semidual_psi" not in state:
                raise ValueError("the state has no semi-dual duals: it was trained without the semi-dual term")
            self.semidual.psi = [p.to(q, copy=True) for p, q in zip(state["semidual_psi"], self.semidual.psi)]
            self.semidual.psi_avg = [p.to(q, copy=True) for p, q in zip(state["semidual_psi_avg"], self.semidual.psi)]
            if self.semidual.generator is not None and state["semidual_rng"] is not None:
                self.semidual.generator.set_state(state["semidual_rng"])
        self.rng.set_state(state["rng"])
        self.step_count = int(state["step"])
        self.history = [float(v) for v in state["history"]]
