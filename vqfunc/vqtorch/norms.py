"""`vqtorch.norms`: the input and codebook normalisations of vqtorch's layers.

A layer's `norm` argument picks a module from `get_norm`, applied to the input either before
it is split into groups (`"bn"`, `"gn"`, `"in"`: torch's batch, group and instance norms over
the channel axis 1) or after, on every (sub-)vector (`"l2"`: unit length; `"l2c"`: length
capped at `MAXNORM_CONSTRAINT_VALUE`). `cb_norm` is applied to the codebook's rows at the start
of every forward pass (`with_codebook_normalization`), with the names the other way round:
`"l2"` caps the length of the codes at `MAXNORM_CONSTRAINT_VALUE`, `"l2c"` makes them unit
length. These are vqtorch's meanings, kept as they are.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MAXNORM_CONSTRAINT_VALUE",
    "GroupNorm",
    "MaxNormConstraint",
    "Normalize",
    "get_norm",
    "match_norm",
    "max_norm",
    "with_codebook_normalization",
]

MAXNORM_CONSTRAINT_VALUE = 10
"""The length cap of `norm="l2c"` inputs and `cb_norm="l2"` codes."""

NORMS = ("none", None, "l2", "l2c", "bn", "gn", "in")
"""Every value a layer's `norm` accepts."""

CODEBOOK_NORMS = ("none", None, "l2", "l2c")
"""Every value a layer's `cb_norm` accepts."""

_F = TypeVar("_F", bound=Callable[..., Any])


class Normalize(nn.Module):
    """Scale every vector along `dim` to unit `p`-norm (`torch.nn.functional.normalize`)."""

    def __init__(self, p: float = 2, dim: int = 1, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = p
        self.dim = dim
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, p=self.p, dim=self.dim, eps=self.eps)


def max_norm(
    w: Tensor,
    p: float = 2,
    dim: int = -1,
    max_norm: float = MAXNORM_CONSTRAINT_VALUE,
    eps: float = 1e-8,
) -> Tensor:
    """`w` with every vector along `dim` rescaled to `min(||w||_p, max_norm)`.

    The target length is not differentiated; the gradient flows through `w / (||w|| + eps)`.
    """
    length = w.norm(p=p, dim=dim, keepdim=True)
    target = length.detach().clamp(max=max_norm)
    return w * (target / (length + eps))


class MaxNormConstraint(nn.Module):
    """`max_norm` as a module: cap every vector's `p`-norm along `dim` at `max_norm`."""

    def __init__(self, max_norm: float = 1, p: float = 2, dim: int = -1, eps: float = 1e-8) -> None:
        super().__init__()
        self.p = p
        self.eps = eps
        self.dim = dim
        self.max_norm = max_norm

    def forward(self, x: Tensor) -> Tensor:
        return max_norm(x, self.p, self.dim, max_norm=self.max_norm, eps=self.eps)


@torch.no_grad()
def normalize_codebooks(module: nn.Module) -> None:
    """Apply `module.codebook_norm` to the rows of every `nn.Embedding` inside `module`."""
    kind = getattr(module, "codebook_norm", None)
    if kind not in ("l2", "l2c"):
        return
    for child in module.modules():
        if isinstance(child, nn.Embedding):
            weight = child.weight.data
            if kind == "l2":
                child.weight.data = max_norm(weight, p=2, dim=1, eps=1e-8)
            else:
                child.weight.data = F.normalize(weight, p=2, dim=1, eps=1e-8)


def with_codebook_normalization(func: _F) -> _F:
    """Decorate a layer's `forward`: normalise its codebook's rows (`self.codebook_norm`) first.

    The rows are rewritten outside autograd, as a projection after each optimizer step.
    """

    @functools.wraps(func)
    def wrapper(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        normalize_codebooks(self)
        return func(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def get_norm(norm: str | None, num_channels: int | None = None) -> tuple[nn.Module, bool]:
    """The input normalisation `norm` and whether it acts before the groups are split.

    Args:
        norm: one of `NORMS`: `"none"` / None (identity), `"l2"`, `"l2c"` (per vector, after
            grouping), `"bn"`, `"gn"`, `"in"` (over channel axis 1, before grouping).
        num_channels: the channels of `"bn"`, `"gn"` and `"in"` (the layer's feature size).

    Returns:
        `(module, before_grouping)`.
    """
    if norm == "l2":
        return Normalize(p=2, dim=-1), False
    if norm == "l2c":
        return MaxNormConstraint(p=2, dim=-1, max_norm=MAXNORM_CONSTRAINT_VALUE), False
    if norm in ("none", None):
        return nn.Identity(), True
    if norm in ("bn", "gn", "in") and num_channels is None:
        raise ValueError(f"get_norm: norm={norm!r} needs num_channels, got None")
    if norm == "bn":
        return nn.BatchNorm2d(num_channels), True  # type: ignore[arg-type]
    if norm == "gn":
        return GroupNorm(num_channels), True  # type: ignore[arg-type]
    if norm == "in":
        return nn.InstanceNorm2d(num_channels), True  # type: ignore[arg-type]
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")


def GroupNorm(in_channels: int) -> nn.GroupNorm:
    """torch's `GroupNorm` with 32 groups, `eps=1e-6` and a learned affine map."""
    return nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


def match_norm(x: Tensor, y: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """`x` with every vector along `dim` rescaled to the 2-norm of the same vector of `y`.

    Args:
        x: a tensor of any shape.
        y: a tensor shaped like `x`.
        dim: the axis of the vectors.
        eps: lower bound of `x`'s norms (a zero vector of `x` stays zero).
    """
    if x.shape != y.shape:
        raise ValueError(
            f"match_norm: x and y must have the same shape, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    x_length = x.norm(p=2, dim=dim, keepdim=True).clamp(min=eps)
    y_length = y.norm(p=2, dim=dim, keepdim=True)
    return y_length * (x / x_length)
