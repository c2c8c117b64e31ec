"""Lookup-free quantization's entropy terms computed in full: every vector's distribution over
all `2**bits` codes, from distances (`softmax(-beta ||z - c||^2)`), as `[N, 2**bits]` float64.

Nothing here imports vqfunc; the tests compare the library's factorised, chunked terms
against these (and differentiate these with autograd for the gradients).
"""

from __future__ import annotations

import torch


def all_codes(bits: int, magnitude: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """`[2**bits, bits]`: row `k` has `+magnitude` where bit `i` of `k` is set, else `-`."""
    k = torch.arange(1 << bits).unsqueeze(1)
    on = (k >> torch.arange(bits)) & 1
    m = torch.tensor(magnitude, dtype=dtype)
    return torch.where(on.bool(), m, -m)


def code_distributions(z: torch.Tensor, magnitude: float, inv_temperature: float) -> torch.Tensor:
    """`[N, 2**bits]` probabilities `p_n(k) ∝ exp(-beta ||z_n - c_k||^2)`."""
    codes = all_codes(z.shape[-1], magnitude, z.dtype)
    squared = (z.unsqueeze(1) - codes.unsqueeze(0)).square().sum(-1)
    return torch.softmax(-inv_temperature * squared, dim=-1)


def entropy_terms(
    z: torch.Tensor,
    magnitude: float,
    inv_temperature: float,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(per-sample entropy, codebook entropy)`: weighted batch means over the rows of `z`."""
    p = code_distributions(z, magnitude, inv_temperature)
    w = torch.ones(z.shape[0], dtype=z.dtype) if weights is None else weights.to(z.dtype)
    total = w.sum().clamp(min=1e-300)
    per_row = -torch.special.xlogy(p, p).sum(-1)
    mean = (p * w.unsqueeze(1)).sum(0) / total
    return (per_row * w).sum() / total, -torch.special.xlogy(mean, mean).sum()
