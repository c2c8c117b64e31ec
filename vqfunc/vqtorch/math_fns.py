"""`vqtorch.math_fns`: the entropy of non-negative weights."""

from __future__ import annotations

from torch import Tensor

__all__ = ["entropy"]


def entropy(x: Tensor, dim: int = -1, eps: float = 1e-8, keepdim: bool = False) -> Tensor:
    """Shannon entropy (in nats) of the distributions `(x + eps) / sum(x + eps)` along `dim`.

    Args:
        x: non-negative weights (e.g. code counts) of any rank >= 1.
        dim: the axis that holds each distribution.
        eps: added to every weight, so that zeros contribute and an all-zero row is uniform.
        keepdim: keep `dim` as an axis of size 1.

    Returns:
        `x`'s shape without `dim` (with it, of size 1, when `keepdim`).

    Unlike vqtorch's version, the result's axes are in the input's order for every `dim`
    (vqtorch moves them for a `dim` other than the last of a tensor of rank 3 or more).
    """
    if x.numel() > 0 and bool(x.min() < 0):
        raise ValueError(
            f"entropy: x must hold non-negative weights, got a minimum of {x.min().item()}"
        )
    p = x + eps
    p = p / p.sum(dim=dim, keepdim=True)
    return -(p * p.log()).sum(dim=dim, keepdim=keepdim)
