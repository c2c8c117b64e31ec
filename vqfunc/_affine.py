"""Affine re-parameterisation of the codebook (Huh et al., 2023).

Effective codes are `c'_k = s * c_k + b` with `s = 1 + affine_lr * s_p` and
`b = affine_lr * b_p`; the raw `s_p, b_p` start at 0, so a fresh layer is unchanged. With
`affine_groups = A`, the codes of a codebook form `A` consecutive blocks, each with its own
scale and bias.
"""

from __future__ import annotations

from torch import Tensor

from vqfunc._config import QuantizerConfig
from vqfunc._params import AnyParams


def effective_codebook(params: AnyParams, cfg: QuantizerConfig) -> Tensor:
    """The codebook the search sees: `params.codebook` with the affine map applied.

    Returns:
        A tensor shaped like `params.codebook` (`[K, d]`, or `[G, K, d]` when not shared).
    """
    if cfg.affine_lr == 0:
        return params.codebook
    return apply_affine(params.codebook, *affine_scale_bias(params, cfg))


def apply_affine(codebook: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """`scale * c + bias` for the codes `c` of `codebook`, block by block.

    Args:
        codebook: `[..., K, d]` codes.
        scale: `[..., A, d]` effective scale of each of `A` consecutive blocks of `K / A` codes
            (the last axis may also be 1, one number per block).
        bias: effective bias, shaped like `scale`.

    Returns:
        A tensor shaped like `codebook`.
    """
    blocks = codebook.unflatten(-2, (scale.shape[-2], -1))  # [..., A, K / A, d]
    mapped = blocks * scale.unsqueeze(-2) + bias.unsqueeze(-2)
    return mapped.flatten(-3, -2)


def affine_scale_bias(params: AnyParams, cfg: QuantizerConfig) -> tuple[Tensor, Tensor]:
    """The effective scale `s` and bias `b`, each `[A, d]` (`[G, A, d]` when not shared)."""
    return 1.0 + cfg.affine_lr * params.affine_scale, cfg.affine_lr * params.affine_bias


def invert_affine(effective: Tensor, params: AnyParams, cfg: QuantizerConfig) -> Tensor:
    """Raw codes whose affine image is `effective` (used to warm an affine codebook)."""
    if cfg.affine_lr == 0:
        return effective
    scale, bias = affine_scale_bias(params, cfg)
    blocks = effective.unflatten(-2, (cfg.affine_groups, -1))
    raw = (blocks - bias.unsqueeze(-2)) / scale.unsqueeze(-2)
    return raw.flatten(-3, -2)
