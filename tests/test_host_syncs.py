"""Host synchronisations of the hot loops (issue 18): per step of a texture synthesis, of a flow against an
MW2Loss and of an EM fit, counted by a dispatch mode.

A host synchronisation is any read of a device value by Python: ``aten._local_scalar_dense`` (what ``.item()``,
``bool()``, ``float()`` and ``int()`` of a tensor dispatch to) and ``Tensor.tolist`` / ``Tensor.numpy`` /
``Tensor.cpu``, which on a CPU-only machine do not dispatch a device copy and are wrapped for the count. On a
GPU each one waits for the device queue to drain. The budget per step is the transport's linear program
(solved on the host: one transfer per ``mw2`` call) and nothing else. Adam's step counter is exempt: torch
keeps it as a host tensor unless ``capturable=True`` (CPU-only parameters cannot be), so reading it is no
device synchronisation on any device.

A failing count prints every read with its Python stack (innermost imgmw frames), naming the file to fix.
"""
from __future__ import annotations

import collections
import contextlib
import traceback
from pathlib import Path
from collections.abc import Iterator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import imgmw
from imgmw import GMM, MW2Loss, WarmStartEM, fit_gmm
from imgmw.flow import SYNC_EVERY, run_flow
from imgmw.texture import TEXTURE_POLICY, synthesize_texture
from imgmw.warm import FitPolicy

WRAPPED = ("tolist", "numpy", "cpu")
EXEMPT = (("torch/optim/optimizer.py", "_get_value"),)   # Adam's host-side step counter (module docstring)
PACKAGE = str(Path(imgmw.__file__).parent) + "/"         # stacks show the frames of imgmw only


class HostReads(TorchDispatchMode):
    """Records every host read (see the module docstring) while active, with the stack of each.

    ``reads`` lists ``(what, stack)`` in order; ``stack`` is the formatted frames of the caller, innermost
    last. Use :func:`counting_host_reads` to also wrap the ``Tensor`` methods that do not dispatch."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, str]] = []

    def record(self, what: str) -> None:
        frames = traceback.extract_stack()[:-2]
        if any(f.filename.endswith(path) and f.name == name for f in frames for path, name in EXEMPT):
            return
        shown = [f for f in frames if f.filename.startswith(PACKAGE)][-5:]
        self.reads.append((what, "\n".join(f"    imgmw/{f.filename[len(PACKAGE):]}:{f.lineno} {f.name}: {f.line}"
                                           for f in shown)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.record("_local_scalar_dense")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting_host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[HostReads]:
    """A :class:`HostReads` mode plus counting wrappers of ``Tensor.tolist / numpy / cpu`` for the block."""
    mode = HostReads()
    active = [True]
    for name in WRAPPED:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, _name=name, **kwargs):
            if active[0]:
                mode.record(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    try:
        with mode:
            yield mode
    finally:
        active[0] = False
        monkeypatch.undo()


def _report(reads: list[tuple[str, str]]) -> str:
    return "\n".join(f"{what}\n{stack}" for what, stack in reads)


def _per_step(marks: list[int], reads: list[tuple[str, str]], steps: range) -> dict[int, list[tuple[str, str]]]:
    """The reads of every step in ``steps`` from the read counts ``marks[t]`` after each step's callback."""
    return {t: reads[marks[t - 1]:marks[t]] for t in steps}


def test_the_counter_sees_every_kind_of_host_read(monkeypatch):
    """Each read the module docstring lists is counted once; device-side work is not."""
    x = torch.arange(6.0).reshape(2, 3)
    with counting_host_reads(monkeypatch) as mode:
        y = (x * 2).sum(0)
        assert len(mode.reads) == 0
        x.sum().item()
        bool(x.any())
        float(x[0, 1])
        int(x[1, 2])
        x.tolist()
        x.numpy()
        x.cpu()
    assert [what for what, _ in mode.reads] == ["_local_scalar_dense"] * 4 + ["tolist", "numpy", "cpu"]
    assert y.shape == (3,) and torch.Tensor.tolist(x) == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]  # unwrapped again


def _exemplar(h: int = 48, w: int = 48) -> torch.Tensor:
    """A smooth colour texture ``[3, h, w]`` in [0, 1] (blurred noise, correlated channels)."""
    g = torch.Generator().manual_seed(0)
    noise = torch.nn.functional.avg_pool2d(torch.rand(1, 3, h + 4, w + 4, generator=g), 5, stride=1)[0]
    mixing = torch.tensor([[1.0, 0.3, 0.0], [0.5, 0.8, 0.1], [0.2, 0.3, 0.6]])
    return (torch.einsum("ij,jhw->ihw", mixing, noise) / mixing.sum(1).view(3, 1, 1)).clamp(0, 1)


def test_a_texture_step_reads_the_host_once(monkeypatch):
    """Steady-state Adam steps of a 2-scale synthesis (re-seeding policy on) between the flow's sync points and
    the policy's fresh-fit checks: the linear programs of all scales, solved in one batched MW2 call, are the
    only host read (the issue's budget is one per scale); a sync point adds one."""
    marks: list[int] = []
    n_scales = 2
    with counting_host_reads(monkeypatch) as mode:
        synthesize_texture(_exemplar(), (40, 40), patch=4, n_components=3, n_scales=n_scales, n_patches=256,
                           n_iter=2 * SYNC_EVERY, diagnose=False, generator=torch.Generator().manual_seed(1),
                           callback=lambda step, image, per_scale: marks.append(len(mode.reads)))
    assert TEXTURE_POLICY.check_every > 2 * SYNC_EVERY   # no fresh-fit check (an EM fit to convergence) in the run
    steps = range(SYNC_EVERY + 1, 2 * SYNC_EVERY - 1)                      # between two sync points
    for t, reads in _per_step(marks, mode.reads, steps).items():
        assert len(reads) == 1, \
            f"step {t}: {len(reads)} host reads, expected 1 for {n_scales} scales:\n{_report(reads)}"
    sync = _per_step(marks, mode.reads, range(SYNC_EVERY - 1, SYNC_EVERY))[SYNC_EVERY - 1]
    assert len(sync) == 2, f"sync point: {len(sync)} host reads:\n{_report(sync)}"


def _blobs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[3.0, 0.0], [-2.0, 1.0]], dtype=torch.float64)
    return centres[torch.randint(0, 2, (n,), generator=g)] + 0.4 * torch.randn(n, 2, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("step", ["gd", "adam"])
def test_a_flow_step_against_an_mw2_loss_reads_only_the_linear_program(monkeypatch, step):
    """run_flow against an MW2Loss (warm start with the default fit-keeping policy): one host read per step
    (the linear program) between sync points, one more (the batch of losses) at each sync point."""
    loss_fn = MW2Loss(_blobs(300, 0), 2, generator=torch.Generator().manual_seed(1))
    x0 = torch.randn(200, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    marks: list[int] = []
    sync_every = 5
    with counting_host_reads(monkeypatch) as mode:
        out = run_flow(x0, lambda x, _: loss_fn(x)[None], n_iter=3 * sync_every, lr=0.05 if step == "adam" else 20.0,
                       step=step, sync_every=sync_every, callback=lambda t, loss, x: marks.append(len(mode.reads)))
    assert len(out.losses) == 3 * sync_every and out.losses[-1] < out.losses[0]
    for t, reads in _per_step(marks, mode.reads, range(2, 3 * sync_every)).items():
        budget = 2 if (t + 1) % sync_every == 0 else 1
        assert len(reads) <= budget, f"step {t}: {len(reads)} host reads, budget {budget}:\n{_report(reads)}"


@pytest.mark.parametrize("d", [2, 12])   # the quadratic-feature (D <= 6) and the whitened E-step kernels
def test_an_em_step_reads_nothing_on_the_host(monkeypatch, d):
    """fit_gmm without a tolerance: the reads of a fit do not grow with its number of EM steps (the entry's
    argument checks are paid once per fit)."""
    g = torch.Generator().manual_seed(3)
    centres = 3 * torch.randn(3, d, generator=g)
    x = centres[torch.randint(0, 3, (500,), generator=g)] + torch.randn(500, d, generator=g)
    sites = {}
    for n_iter in (2, 6):
        with counting_host_reads(monkeypatch) as mode:
            fit_gmm(x, 3, n_iter=n_iter, tol=None, grad="none", generator=torch.Generator().manual_seed(0))
        sites[n_iter] = collections.Counter(mode.reads)
    extra = sites[6] - sites[2]
    assert not extra, "host reads that grow with the EM steps (count over 4 more steps):\n" + "\n".join(
        f"{n}x {what}\n{stack}" for (what, stack), n in extra.items())


def test_a_warm_start_call_with_refining_and_reseeding_reads_nothing_on_the_host(monkeypatch):
    """WarmStartEM with fixed weights, refine steps and the re-seed test (a component starved at the start): the
    calls between fresh-fit checks read nothing on the host, and the policy still acts (the counters, device
    tensors, say so when read afterwards). The input's finiteness check is the one read of a standalone call;
    the losses skip it (their linear program rejects a non-finite fit)."""
    x = _blobs(400, 4)
    start = GMM(torch.full((3,), 1 / 3, dtype=torch.float64),
                torch.tensor([[3.0, 0.0], [-2.0, 1.0], [30.0, 30.0]], dtype=torch.float64),
                torch.eye(2, dtype=torch.float64).expand(3, 2, 2).clone())
    em = WarmStartEM(3, init=start, fixed_weights=True, n_init_iter=1,
                     policy=FitPolicy(max_refine=3, refine_tol=0.0, check_every=0))
    em(x)                                             # first call: the fit from the start
    with counting_host_reads(monkeypatch) as mode:
        for _ in range(3):
            em(x + 0.01, check_finite=False)
    assert not mode.reads, f"{len(mode.reads)} host reads in 3 calls:\n{_report(mode.reads)}"
    with counting_host_reads(monkeypatch) as mode:
        em(x + 0.01)
    assert len(mode.reads) == 1, f"{len(mode.reads)} host reads in a checked call:\n{_report(mode.reads)}"
    assert int(em.diagnostics.reseeds) >= 1 and int(em.diagnostics.refine_steps) >= 1
