"""`VQParams`: the learned tensors of a quantizer, and `init_params`."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from vqfunc._config import QuantizerConfig


class VQParams(NamedTuple):
    """Learned tensors of a quantizer (a pytree for `torch.func` and `optree`).

    Attributes:
        codebook: `[K, d]` codes when shared, `[G, K, d]` with one codebook per group.
        affine_scale: raw affine scale `s_p`, `[A, d]` (`[G, A, d]` with separate codebooks),
            where `A = cfg.affine_groups`; `[0, d]` (`[G, 0, d]`) when `cfg.affine_lr == 0`.
        affine_bias: raw affine bias `b_p`, shaped like `affine_scale`.
    """

    codebook: Tensor
    affine_scale: Tensor
    affine_bias: Tensor


def init_params(
    cfg: QuantizerConfig,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> VQParams:
    """Fresh parameters: a standard-normal codebook and zero raw affine parameters.

    Args:
        cfg: the quantizer's configuration (a `VQConfig` or a `vqfunc.residual.ResidualConfig`).
        generator: source of randomness; the same seed gives the same codebook.
        device: where to create the tensors (default: the generator's device, else the
            default device); the values are drawn on the generator's device, so they do not
            depend on `device`.
        dtype: floating dtype of the tensors (default: `torch.get_default_dtype()`).

    Returns:
        `VQParams` with `codebook` of shape `cfg.layout.codebook_shape`.
    """
    dtype = dtype or torch.get_default_dtype()
    if not dtype.is_floating_point:
        raise TypeError(f"init_params: dtype must be a floating dtype, got {dtype}")
    if device is None and generator is not None:
        device = generator.device
    # Sample where the generator lives, then move: a CPU generator also seeds a CUDA codebook,
    # with the same values on every device.
    sample_device = generator.device if generator is not None else device
    codebook = torch.randn(
        cfg.layout.codebook_shape, generator=generator, device=sample_device, dtype=dtype
    ).to(device)
    zeros = torch.zeros(cfg.layout.affine_shape, device=codebook.device, dtype=dtype)
    return VQParams(codebook=codebook, affine_scale=zeros, affine_bias=zeros.clone())


class ResidualParams(NamedTuple):
    """Learned tensors of a residual quantizer with low-dimensional codebooks
    (`ResidualConfig.codebook_dim = d`), a pytree like `VQParams` with four more fields.

    Level `i` searches its codebook with `e = r @ proj_in[i] + proj_in_bias[i]` (`[*, d]`) and
    adds `c @ proj_out[i] + proj_out_bias[i]` (`[*, F]`) for its code `c`.

    Attributes:
        codebook: `[K, d]` codes when shared, `[L, K, d]` with one codebook per level.
        affine_scale: raw affine scale, as in `VQParams` (with code size `d`).
        affine_bias: raw affine bias, shaped like `affine_scale`.
        proj_in: `[L, F, d]` input projection of every level.
        proj_in_bias: `[L, d]` its bias.
        proj_out: `[L, d, F]` output projection of every level.
        proj_out_bias: `[L, F]` its bias.
    """

    codebook: Tensor
    affine_scale: Tensor
    affine_bias: Tensor
    proj_in: Tensor
    proj_in_bias: Tensor
    proj_out: Tensor
    proj_out_bias: Tensor


# Either record: what the functions shared by both kinds of quantizer read (`codebook`, ...).
AnyParams = VQParams | ResidualParams
