"""The commitment loss of vqtorch (Huh et al., 2023)."""

from __future__ import annotations

import torch
from torch import Tensor


def commitment_loss(
    z: Tensor, z_q: Tensor, beta: float = 0.95, *, mask: Tensor | None = None
) -> Tensor:
    """`(1 - beta) * mse(z, sg(z_q)) + beta * mse(sg(z), z_q)`, a scalar mean.

    The first term pulls the encoder output towards its code, the second the code towards the
    encoder output. Both terms have the same value; `beta` only splits the gradient.

    Args:
        z: `[..., F]` encoder vectors (e.g. `QuantizeOutput.z`).
        z_q: `[..., F]` their selected codes (e.g. `QuantizeOutput.codewords`), same shape as `z`.
        beta: weight of the codebook term, in [0, 1].
        mask: optional `[...]` tensor (bool or float weights) over the leading axes of `z`;
            rows with weight 0 do not count. The mean is taken over the weighted elements.

    Returns:
        A scalar tensor; 0 for an empty (or fully masked) batch.
    """
    if z.shape != z_q.shape:
        raise ValueError(
            f"commitment_loss: z has shape {tuple(z.shape)} but z_q has shape "
            f"{tuple(z_q.shape)}; expected equal shapes"
        )
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"commitment_loss: beta must be in [0, 1], got {beta!r}")
    encoder_term = (z - z_q.detach()).square()
    codebook_term = (z.detach() - z_q).square()
    elementwise = (1.0 - beta) * encoder_term + beta * codebook_term
    if mask is None:
        return elementwise.sum() / max(elementwise.numel(), 1)
    if tuple(mask.shape) != tuple(z.shape[:-1]):
        raise ValueError(
            f"commitment_loss: mask has shape {tuple(mask.shape)}, expected the leading shape "
            f"of z, {tuple(z.shape[:-1])}"
        )
    weights = mask.to(elementwise.dtype)
    total = (elementwise.sum(-1) * weights).sum()
    count = weights.sum() * z.shape[-1]
    return total / torch.clamp(count, min=1.0)
