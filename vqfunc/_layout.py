"""Moving the quantized axis last, splitting it into groups, and back.

Every reshape of the library lives here. An input `x` with feature axis `dim` of size `F`
becomes rows `[M, G, d]` (`M` the product of all other axes, `G = groups`, `d = F // G`), and
rows go back to `x`'s layout.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from vqfunc._config import VQConfig


class Layout(NamedTuple):
    """How rows map back onto an input: its batch shape (input shape minus `dim`) and axis."""

    batch_shape: tuple[int, ...]
    dim: int


def normalize_dim(dim: int, ndim: int, *, where: str, name: str = "dim") -> int:
    """`dim` as a non-negative axis of a rank-`ndim` tensor, or a clear error."""
    if not -ndim <= dim < ndim:
        hint = " (for a single [F] vector use dim=-1 or dim=0)" if ndim == 1 else ""
        raise IndexError(
            f"{where}: {name}={dim} is out of range for an input of rank {ndim}; "
            f"expected a value in [{-ndim}, {ndim - 1}]{hint}"
        )
    return dim % ndim


def to_rows(x: Tensor, dim: int, groups: int) -> tuple[Tensor, Layout]:
    """`x: [..., F (at dim), ...]` -> rows `[M, G, F / G]` and the layout to undo it."""
    dim = dim % x.ndim
    moved = x.movedim(dim, -1)
    batch_shape = tuple(moved.shape[:-1])
    rows = moved.reshape(-1, groups, moved.shape[-1] // groups)
    return rows, Layout(batch_shape, dim)


def from_rows(rows: Tensor, layout: Layout) -> Tensor:
    """Rows `[M, G, d]` -> the input's layout `[..., F (at dim), ...]`."""
    return rows_to_batch(rows, layout).movedim(-1, layout.dim)


def rows_to_batch(rows: Tensor, layout: Layout) -> Tensor:
    """Rows `[M, G, d]` -> `[*batch, F]`: the input's layout with the feature axis last."""
    return rows.reshape(*layout.batch_shape, rows.shape[-2] * rows.shape[-1])


def codes_to_batch(codes: Tensor, layout: Layout, cfg: VQConfig) -> Tensor:
    """Per-row values `[M, G]` -> `[*batch]` (or `[*batch, G]` when `groups > 1`)."""
    if cfg.groups == 1:
        return codes.reshape(layout.batch_shape)
    return codes.reshape(*layout.batch_shape, cfg.groups)


def codes_to_rows(codes: Tensor, cfg: VQConfig) -> tuple[Tensor, Layout]:
    """Codes `[*batch]` (or `[*batch, G]`) -> `[M, G]` and the layout of the output.

    The output layout puts the feature axis at `cfg.dim` of a tensor of rank `len(batch) + 1`.
    """
    batch_shape = tuple(codes.shape) if cfg.groups == 1 else tuple(codes.shape[:-1])
    ndim = len(batch_shape) + 1
    dim = normalize_dim(cfg.dim, ndim, where="dequantize", name="cfg.dim")
    return codes.reshape(-1, cfg.groups), Layout(batch_shape, dim)
