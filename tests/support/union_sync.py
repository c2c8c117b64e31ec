"""Two ranks in one process, for `sync=` arguments that only need `reduce_sum`."""

from __future__ import annotations

import torch


class UnionSync:
    """`reduce_sum` adds the sums another rank recorded (`other`); without `other`, it records
    this call's sums in `seen` and returns them unchanged (that rank's own view)."""

    def __init__(self, other: tuple[torch.Tensor, ...] | None = None) -> None:
        self.other = other
        self.seen: tuple[torch.Tensor, ...] | None = None

    def reduce_sum(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.seen = tuple(t.detach().clone() for t in tensors)
        if self.other is None:
            return tuple(t.clone() for t in tensors)
        return tuple(t + o for t, o in zip(tensors, self.other, strict=True))
