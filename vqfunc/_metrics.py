"""Code statistics: histogram, perplexity and usage."""

from __future__ import annotations

import torch
from torch import Tensor


def code_histogram(codes: Tensor, num_codes: int, *, weights: Tensor | None = None) -> Tensor:
    """How often each code is used, `n_k`.

    Args:
        codes: integer tensor of any shape with values in `[0, num_codes)`.
        num_codes: number of codes `K`.
        weights: optional tensor shaped like `codes` (bool or float), e.g. a mask.

    Returns:
        `[K]` float counts (float32, or `weights`' floating dtype).
    """
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"code_histogram: codes must be an integer tensor, got {codes.dtype}")
    flat = codes.reshape(-1)
    if weights is None:
        values = torch.ones(flat.shape, device=codes.device)
    else:
        values = weights.reshape(-1).to(torch.promote_types(weights.dtype, torch.float32))
    return values.new_zeros(num_codes).scatter_add(0, flat, values)


def perplexity(histogram: Tensor) -> Tensor:
    """`exp(-sum_k p_k log p_k)` with `p_k = n_k / N`, over the last axis of `histogram`.

    Ranges from 1 (one code used) to `K` (all codes equally used); 1 for an empty histogram.
    Integer counts (e.g. from `torch.bincount`) give a float32 result.
    """
    histogram = _as_float(histogram, where="perplexity")
    total = histogram.sum(-1, keepdim=True)
    p = histogram / torch.clamp(total, min=torch.finfo(histogram.dtype).tiny)
    entropy = -torch.special.xlogy(p, p).sum(-1)
    return entropy.exp()


def usage(histogram: Tensor) -> Tensor:
    """Fraction of codes used at least once, `|{k : n_k > 0}| / K`, over the last axis."""
    histogram = _as_float(histogram, where="usage")
    return (histogram > 0).to(histogram.dtype).mean(-1)


def _as_float(histogram: Tensor, *, where: str) -> Tensor:
    """Counts as a floating tensor (integer counts become float32)."""
    if not isinstance(histogram, Tensor):
        raise TypeError(
            f"{where}: histogram must be a tensor of counts (e.g. from code_histogram), "
            f"got {type(histogram).__name__}"
        )
    if histogram.dtype.is_floating_point:
        return histogram
    if histogram.dtype.is_complex:
        raise TypeError(f"{where}: histogram must hold real counts, got {histogram.dtype}")
    return histogram.to(torch.float32)
