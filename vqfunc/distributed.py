"""Consistent codebooks under `torch.distributed`: the collectives, and nothing else.

Gradient all-reduce (DistributedDataParallel, FSDP) keeps the *learned* parameters of the
replicas equal, but a quantizer also changes its codebook from data: warm-up and k-means,
EMA statistics, dead-code counters and replacements. This module supplies the collectives that
keep those updates identical on every rank of a process group; the pure functions of the core
take them as an explicit `sync=` argument (`sync_for(group)`, None when not distributed):

- **Warm-up and k-means** (`ProcessGroupSync.fit_on_first_rank`, used by
  `vqfunc.warmup_params(..., sync=)`): the vectors of every rank (unequal counts allowed, empty
  ones included) are gathered on the group's first rank, which fits the codebook with *its*
  generator and broadcasts it. The fitted codebook is bit-identical on every rank, whatever
  the ranks' generators and however nondeterministic the device's kernels are.
- **EMA statistics and code counts** (`ProcessGroupSync.reduce_sum`): per-code counts, sums and
  the histogram that drives the dead-code counters are summed over the ranks (one all-reduce),
  so the update equals the single-process update on the union of the batches.
- **Replacement candidates** (`ProcessGroupSync.share_candidates`): every rank draws its own
  fixed-size candidates, the candidates of all ranks are all-gathered, and code `k` takes the
  candidate of rank `k mod W` (the next rank that has one when that rank's batch held no valid
  vector). All ranks then pick the same vectors without sharing a seed.
- **The layer's in-place codebook step** (`inplace_optimizer`) takes the gradient averaged over
  the ranks (`ProcessGroupSync.reduce_mean`), as DistributedDataParallel would.

Every collective has a shape fixed by the configuration (or is preceded by an exchange of
sizes), so each rank issues the same collectives in the same order whatever its data: a rank
with an empty or fully masked batch takes part like the others and nothing hangs.

When `torch.distributed` is not initialised (or the group has a single rank) `sync_for`
returns None, and the functions given `sync=None` run the local computation and issue no
collective, so single-process code needs no flag. `group=None` means the default (world) group.

Functional use::

    sync = vqfunc.distributed.sync_for(group)          # None when not distributed
    params = vqfunc.warmup_params(params, x, cfg, method="kmeans", sync=sync)
    ...
    params, state = vqfunc.update_state(params, state, out, cfg, sync=sync)

The layer shim does the same by itself once the process group is initialised.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from vqfunc._replace import Candidates

__all__ = [
    "ProcessGroupSync",
    "ReduceSync",
    "StateSync",
    "WarmupSync",
    "active_group",
    "sync_for",
]

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class ReduceSync(Protocol):
    """What `vqfunc.lfq.quantize(..., sync=)` needs: sums over the replicas.

    `ProcessGroupSync` implements it with `torch.distributed`.
    """

    def reduce_sum(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """Element-wise sums of each tensor over the replicas (inputs unchanged)."""
        ...


class StateSync(Protocol):
    """What `vqfunc.update_state(..., sync=)` needs to keep replicas in agreement.

    `ProcessGroupSync` implements it with `torch.distributed`; any object with these two
    methods works (e.g. a test double, or another communication library).
    """

    def reduce_sum(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """Element-wise sums of each tensor over the replicas (inputs unchanged)."""
        ...

    def share_candidates(self, candidates: Candidates) -> Candidates:
        """Replacement candidates identical on every replica."""
        ...


class WarmupSync(Protocol):
    """What `vqfunc.warmup_params(..., sync=)` needs to fit one codebook for all replicas."""

    def fit_on_first_rank(
        self, rows: Tensor, like: Tensor, fit: Callable[[Tensor], Tensor]
    ) -> Tensor | None:
        """`fit` of the rows of every replica, computed once and shared; None without rows."""
        ...


def active_group(group: ProcessGroup | None = None) -> ProcessGroup | None:
    """The group to keep in agreement, or None when there is nothing to synchronise.

    Args:
        group: a process group, or None for the default (world) group.

    Returns:
        The group (the world group for None) when `torch.distributed` is available and
        initialised and the group has at least two ranks; None otherwise.
    """
    if not dist.is_available() or not dist.is_initialized():
        return None
    if group is None:
        group = dist.group.WORLD
    if dist.get_world_size(group) < 2:
        return None
    return group


def sync_for(group: ProcessGroup | None = None) -> ProcessGroupSync | None:
    """A `ProcessGroupSync` for `update_state(..., sync=)` and `warmup_params(..., sync=)`, or
    None when not distributed (then no collective runs)."""
    active = active_group(group)
    return None if active is None else ProcessGroupSync(active)


class ProcessGroupSync:
    """The reductions that keep the state updates of `vqfunc.update_state` equal on all ranks.

    Every method is a collective: all ranks of the group must call it, in the same order, with
    tensors of the same shapes (which `update_state` guarantees: shapes follow from the
    configuration, not from the data).

    Args:
        group: the process group (from `active_group`; it must hold at least two ranks).
    """

    def __init__(self, group: ProcessGroup) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)

    def reduce_sum(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """Element-wise sums over the ranks, in one all-reduce; the inputs are not changed.

        Args:
            *tensors: floating tensors of any shapes (all on one device).

        Returns:
            The sums, shaped and typed like the inputs.
        """
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        sizes = [t.numel() for t in tensors]
        return tuple(
            part.view(t.shape).to(t.dtype)
            for part, t in zip(flat.split(sizes), tensors, strict=True)
        )

    def reduce_mean(self, x: Tensor) -> Tensor:
        """The mean of `x` over the ranks (as DistributedDataParallel averages gradients)."""
        (total,) = self.reduce_sum(x)
        return total / self.world_size

    def all_gather(self, x: Tensor) -> Tensor:
        """`x` of every rank, stacked in rank order: `[W, *x.shape]` (same shape on every rank)."""
        return _all_gather(x, self.group, self.world_size)

    def fit_on_first_rank(
        self, rows: Tensor, like: Tensor, fit: Callable[[Tensor], Tensor]
    ) -> Tensor | None:
        """`fit` of the rows of every rank, computed on the group's first rank and broadcast.

        The collective behind the warm-ups (`vqfunc.warmup_params(..., sync=)` and
        `vqfunc.residual.warmup_params`): every rank calls it once, whatever its number of
        rows; sizes and non-finite counts are exchanged first, so every rank decides alike.

        Args:
            rows: this rank's `[M, F]` vectors (`M` may differ between ranks, or be 0).
            like: a tensor shaped, typed and placed like `fit`'s result (e.g. the codebook).
            fit: `[M_total, F]` rows of all ranks, in rank order -> a tensor like `like`. Runs
                on the first rank only (so only its generator matters).

        Returns:
            `fit`'s result, identical on every rank; None on every rank when no rank has rows.

        Raises:
            ValueError: on every rank, when some rank's rows are not finite.
            RuntimeError: on the other ranks, when `fit` raises on the first rank (which
                re-raises its own error).
        """
        return _fit_on_first_rank(rows, like, fit, self.group)

    def share_candidates(self, candidates: Candidates) -> Candidates:
        """Candidates that every rank agrees on, drawn from the candidates of all ranks.

        Code `k` takes rank `(k + j) mod W`'s candidate for the smallest `j` whose rank has a
        valid one; it is invalid only when no rank has a valid candidate for it. One
        all-gather of the vectors and their validity.

        Args:
            candidates: this rank's `Candidates` (`[num_books, K, d]`, `[num_books, K]`).

        Returns:
            `Candidates` of the same shapes, identical on every rank.
        """
        vectors = candidates.vectors
        books, k, d = vectors.shape
        # Validity travels with the vectors as one extra column: one collective, not two.
        packed = torch.cat([vectors, candidates.valid.to(vectors.dtype).unsqueeze(-1)], dim=-1)
        gathered = self.all_gather(packed)  # [W, books, K, d + 1]
        world = self.world_size
        code = torch.arange(k, device=vectors.device)
        # order[j, k]: the rank tried j-th for code k.
        order = (
            code.unsqueeze(0) + torch.arange(world, device=vectors.device).unsqueeze(1)
        ) % world
        index = order.view(world, 1, k, 1).expand(world, books, k, d + 1)
        in_order = gathered.gather(0, index)  # [W, books, K, d + 1], by preference
        valid = in_order[..., d] > 0
        # argmax returns the first maximum: the first rank in the order with a valid candidate.
        first = valid.to(torch.uint8).argmax(0)  # [books, K]
        pick = first.view(1, books, k, 1).expand(1, books, k, d)
        chosen = in_order[..., :d].gather(0, pick).squeeze(0)
        return Candidates(chosen, valid.any(0))


def _all_gather(x: Tensor, group: ProcessGroup, world: int) -> Tensor:
    """`[W, *x.shape]`; gathered flat, the one layout every backend accepts."""
    out = x.new_empty(world * x.numel())
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch < 2.13
    gather(out, x.detach().reshape(-1).contiguous(), group=group)
    return out.view(world, *x.shape)


def _fit_on_first_rank(
    rows: Tensor, like: Tensor, fit: Callable[[Tensor], Tensor], active: ProcessGroup
) -> Tensor | None:
    """`ProcessGroupSync.fit_on_first_rank` on the group `active` (at least two ranks)."""
    world = dist.get_world_size(active)
    first = dist.get_global_rank(active, 0)
    is_first = dist.get_rank(active) == 0
    device = rows.device
    # 1. Sizes and non-finite counts of every rank: every rank then takes the same decision.
    local = torch.tensor(
        [rows.shape[0], int((~torch.isfinite(rows)).sum())], dtype=torch.long, device=device
    )
    info = _all_gather(local, active, world)
    counts = info[:, 0].tolist()
    bad = info[:, 1].tolist()
    if any(bad):
        where = ", ".join(f"rank {r}: {b}" for r, b in enumerate(bad) if b)
        raise ValueError(
            f"warmup_params: x holds non-finite values (NaN or Inf) ({where}); expected finite "
            "data to warm the codebook from"
        )
    if sum(counts) == 0:
        return None
    # 2. Rows of every rank, padded to the largest count, gathered on the first rank.
    longest = max(counts)
    padded = rows.new_zeros(longest, rows.shape[1])
    padded[: rows.shape[0]] = rows
    gather_list = [torch.empty_like(padded) for _ in range(world)] if is_first else None
    dist.gather(padded, gather_list, dst=first, group=active)
    # 3. The first rank fits; a failure there is told to every rank before any broadcast.
    result = like.detach().clone(memory_format=torch.contiguous_format)
    status = torch.zeros(1, dtype=torch.long, device=device)
    error: Exception | None = None
    if is_first:
        assert gather_list is not None
        data = torch.cat([part[:n] for part, n in zip(gather_list, counts, strict=True)])
        try:
            result = fit(data).detach().to(like.dtype).contiguous()
        except Exception as exc:  # re-raised below, after the other ranks are told
            error = exc
            status.fill_(1)
    dist.broadcast(status, src=first, group=active)
    if error is not None:
        raise error
    if int(status) != 0:
        raise RuntimeError(
            "warmup_params: fitting the codebook failed on the group's first rank "
            f"(global rank {first}); see its error"
        )
    dist.broadcast(result, src=first, group=active)
    return result
