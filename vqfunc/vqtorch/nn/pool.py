"""`vqtorch.nn.pool`: 2-d pooling that picks or blends whole feature vectors.

A pooling window over a `[B, C, H, W]` map holds `kernel_size ** 2` vectors of `C` features;
instead of pooling every channel on its own, these layers weigh the vectors by a function of
their 2-norms (computed without gradient) and sum them: `MaxVecPool2d` keeps the vector of
largest norm, `SoftMaxVecPool2d` averages them with softmax weights of their norms.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MaxVecPool2d", "SoftMaxVecPool2d"]

Weighting = Callable[..., Tensor]


class _VecPool2d(nn.Module):
    """Weigh the vectors of each window by `weighting_fn(norms, dim=1)` and sum them."""

    def __init__(
        self,
        weighting_fn: Weighting,
        kernel_size: int = 3,
        stride: int = 2,
        padding: int = 2,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.k = kernel_size
        self.s = stride
        self.p = padding
        self.d = dilation
        self.weighting_fn = weighting_fn
        self.unfold = nn.Unfold(kernel_size=self.k, dilation=self.d, padding=self.p, stride=self.s)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        span = self.d * (self.k - 1) + 1
        out_h = (h + 2 * self.p - span) // self.s + 1
        out_w = (w + 2 * self.p - span) // self.s + 1
        with torch.no_grad():
            norms = self.unfold(x.norm(p=2, dim=1, keepdim=True))  # [B, k*k, L]
            weights = self.weighting_fn(norms, dim=1).unsqueeze(1)  # [B, 1, k*k, L]
        windows = self.unfold(x).view(b, c, -1, out_h * out_w)  # [B, C, k*k, L]
        return (weights * windows).sum(2).view(b, c, out_h, out_w)


class MaxVecPool2d(_VecPool2d):
    """Keep, in every window, the feature vector with the largest 2-norm."""

    def __init__(
        self, kernel_size: int = 3, stride: int = 2, padding: int = 2, dilation: int = 1
    ) -> None:
        super().__init__(MaxVecPool2d.max_onehot, kernel_size, stride, padding, dilation)

    @staticmethod
    def max_onehot(x: Tensor, dim: int) -> Tensor:
        """`[B, S, N]` scores -> one-hot `[B, S, N]` of the largest score over axis 1, with
        the one-hot axis then swapped to `dim`."""
        b, s, n = x.shape
        picked = F.one_hot(x.argmax(dim=1).reshape(-1), s).view(b, n, s)
        return picked.swapaxes(-1, dim)


class SoftMaxVecPool2d(_VecPool2d):
    """Average the feature vectors of every window with softmax weights of their 2-norms."""

    def __init__(
        self, kernel_size: int = 3, stride: int = 2, padding: int = 2, dilation: int = 1
    ) -> None:
        super().__init__(torch.softmax, kernel_size, stride, padding, dilation)
