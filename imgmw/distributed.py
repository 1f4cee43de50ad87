"""EM over data sharded across processes: sums reduced with ``torch.distributed``.

Every statistic EM needs is a sum over points (:mod:`imgmw.stats`): ``s0_k = Σ ω r``, ``s1_k = Σ ω r (x − c_k)``,
``s2_k = Σ ω r (x − c_k)(x − c_k)ᵀ``, ``Σ ω log p(x)`` and ``Σ ω``. With the points split over ranks, each rank
sums over its own shard and one ``all_reduce(SUM)`` gives every rank the statistics of the concatenated data,
so every rank takes the same M-step and ends with the same parameters (the reduction of gloo and NCCL returns
identical bits on all ranks). Per EM step one flat buffer of ``B·(K(1 + D + D²) + 2)`` numbers crosses the
wire, whatever the number of points.

The reduction is differentiable (:class:`_AllReduceSum`): its backward all-reduces the incoming gradients,
so ``loss_r.backward()`` on every rank gives each rank the gradient of ``Σ_r loss_r`` with respect to its own
points; with DistributedDataParallel's averaging of the weight gradients on top, the weights receive exactly
the gradient of the (common) loss over all ranks' points.

A shard may hold any number ``N ≥ 1`` of points; a rank with nothing to contribute passes one point with a
``False`` mask (every rank must take part in every reduction).

``process_group`` is any ``torch.distributed`` process group, or :data:`WORLD` for the default one
(``torch.distributed.init_process_group`` must have run). ``None`` everywhere means one process.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from .stats import QuadFeatures, SuffStats, accumulate_stats

__all__ = ["WORLD", "check_process_group", "all_reduce_sum", "reduce_stats", "global_stats", "broadcast_from_first",
           "all_gather_stack", "check_same_problem", "check_same_tensor", "shard_range", "world_size", "rank"]

WORLD = "world"  # process_group=WORLD: the default group of init_process_group


def check_process_group(process_group):
    """``process_group`` as a ``torch.distributed`` group (``None`` stays ``None``: one process).

    Raises ``ValueError`` when a group is asked for but ``torch.distributed`` is not initialised."""
    if process_group is None:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group is given but torch.distributed is not initialised; call "
                         "torch.distributed.init_process_group (torchrun does the set-up) or pass process_group=None")
    if isinstance(process_group, str):
        if process_group != WORLD:
            raise ValueError(f"process_group must be a torch.distributed group, {WORLD!r} or None; "
                             f"got {process_group!r}")
        return dist.group.WORLD
    return process_group


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s contiguous block of ``range(n)``: sizes differ by at most one, earlier ranks first, so
    the ranks' shards concatenated in rank order are ``range(n)`` in order."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def world_size(group) -> int:
    """Number of processes in ``group`` (1 for ``None``)."""
    return 1 if group is None else dist.get_world_size(group)


def rank(group) -> int:
    """This process's rank in ``group`` (0 for ``None``)."""
    return 0 if group is None else dist.get_rank(group)


class _AllReduceSum(torch.autograd.Function):
    """``y = Σ_r t_r`` on every rank; backward: ``∂/∂t_r Σ_r' L_r' = Σ_r' ∂L_r'/∂y`` (all-reduce of grads)."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        ctx.group = group
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum(t: Tensor, group) -> Tensor:
    """``Σ_r t_r`` over the ranks of ``group`` (``t`` itself for ``None``), differentiable, out of place."""
    if group is None:
        return t
    if torch.is_grad_enabled() and t.requires_grad:
        return _AllReduceSum.apply(t.contiguous(), group)
    out = t.detach().contiguous().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def reduce_stats(stats: SuffStats, group) -> SuffStats:
    """Statistics of the concatenated shards: the five sums of ``stats`` all-reduced in ONE flat buffer.
    ``stats.shift`` must be equal on all ranks (the means of a GMM every rank holds)."""
    if group is None:
        return stats
    parts = (stats.s0, stats.s1, stats.s2, stats.log_lik, stats.total)
    dtype = torch.promote_types(stats.s0.dtype, stats.log_lik.dtype)
    flat = all_reduce_sum(torch.cat([p.to(dtype).reshape(-1) for p in parts]), group)
    out, start = [], 0
    for p in parts:
        out.append(flat[start:start + p.numel()].reshape(p.shape).to(p.dtype))
        start += p.numel()
    s0, s1, s2, log_lik, total = out
    return SuffStats(s0, s1, s2, log_lik, total, stats.shift)


def global_stats(gmm, x: Tensor, weight: Tensor | None, chunk_size: int | None, features: QuadFeatures | None,
                 group) -> SuffStats:
    """:func:`imgmw.stats.accumulate_stats` on this rank's points, reduced over ``group``."""
    return reduce_stats(accumulate_stats(gmm, x, weight, chunk_size, features), group)


def broadcast_from_first(t: Tensor, group) -> Tensor:
    """``t`` of the group's first rank on every rank (a copy; ``t`` itself for ``None``)."""
    if group is None:
        return t
    out = t.contiguous().clone()
    dist.broadcast(out, src=dist.get_global_rank(group, 0), group=group)
    return out


def all_gather_stack(t: Tensor, group) -> Tensor:
    """``[W, *t.shape]``: ``t`` of every rank, in rank order (``t[None]`` for ``None``)."""
    if group is None:
        return t.unsqueeze(0)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.stack(out)


_DTYPE_CODES = {torch.float32: 1, torch.float64: 2}


def check_same_problem(x: Tensor, n_components: int, group) -> None:
    """Every rank must pass points with the same batch shape, dimension and dtype and the same ``K``; a
    mismatch would hang or corrupt the reductions, so it raises ``ValueError`` on every rank instead."""
    if group is None:
        return
    bshape = tuple(x.shape[:-2])
    desc = torch.tensor([len(bshape), math.prod(bshape), x.shape[-1], n_components, _DTYPE_CODES.get(x.dtype, 0),
                         hash(bshape) % (1 << 31)], dtype=torch.int64, device=x.device)
    hi, lo = desc.clone(), desc.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    if not bool(torch.equal(hi, lo)):
        raise ValueError(f"ranks disagree on the problem: this rank has x of shape {tuple(x.shape)} ({x.dtype}) and "
                         f"n_components={n_components}; every rank needs the same batch shape *B, dimension D, dtype "
                         "and n_components (only N may differ)")


def check_same_tensor(t: Tensor, group, what: str) -> None:
    """``t`` (same shape on every rank) must be equal on all ranks, else ``ValueError`` naming ``what``."""
    if group is None:
        return
    flat = t.detach().reshape(-1).double()
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    if not bool(torch.equal(hi, lo)):
        raise ValueError(f"{what} differs between ranks; every rank must pass the same one")
