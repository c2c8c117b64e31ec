"""Residual finite scalar quantization: every stage rounds what the earlier stages left.

Stage 0 is the plain quantizer: `u = bounded(x)` (the bounded values, in the output's units)
is rounded to the grid, `q_0 = grid(u)`. Stage `i >= 1` rounds the remainder on the grid
scaled by `s_i = rho ** i` per feature: `q_i = s_i * grid(r_{i-1} / s_i)` with
`r_i = u - q_0 - ... - q_i`, the grid's rounding clamped to its range (the remainder is
already bounded, so no `tanh`). With `step` the grid's spacing and `top` its largest value,
`rho = (step / 2) / top`: the scaled grid of stage `i` just reaches the largest remainder
`s_{i-1} * step / 2` that stage `i - 1` leaves, so every stage shrinks the error bound by `rho`.
On the symmetric grid (the default here) `rho = 1 / (L - 1)`; on the paper's grid
`rho = 1 / (L - 1)` for odd `L` and `1 / (L - 2)` for even `L` (whose top value is `1 - step`),
and `L = 2`, whose top value is 0, is refused.

The output `z_q = q_0 + ... + q_{Q-1}` approaches `u`. Its gradient is that of `u`, the plain
quantizer's straight-through estimate, applied once to the sum (as `vqfunc.residual` applies
its estimator to the sum of its levels).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from vqfunc import _validate
from vqfunc._layout import Layout, from_rows, normalize_dim, rows_to_batch, to_rows
from vqfunc._metrics import perplexity, usage
from vqfunc.fsq._config import ResidualFSQConfig
from vqfunc.fsq._quantize import (
    _check_codes,
    _check_dtype,
    _row_mask,
    bound,
    check_config,
    codes_to_indices,
    compute_dtype,
    grid_histogram,
    grid_round,
    indices_to_codes,
    level_values,
    straight_through,
)


class ResidualFSQOutput(NamedTuple):
    """Everything `vqfunc.fsq.quantize_residual` computed besides the quantized tensor.

    With `B` the input's shape without its feature axis and `Q = cfg.num_quantizers`:

    Attributes:
        codes: `[*B, Q]` int64 code of every stage, each in `[0, cfg.codebook_size)`.
        bounded: `[*B, F]` the bounded values `u` the stages approximate (the returned `z_q`
            takes their gradient), in the compute dtype.
        residuals: `[*B, Q + 1, F]` the remainders `r_{-1} = u, r_0, ..., r_{Q-1} = u - z_q`.
        perplexity: scalar code perplexity (mean over stages).
        usage: scalar fraction of codes used at least once (mean over stages).
        histogram: `[Q, cfg.codebook_size]` code counts of every stage (masked rows excluded).
    """

    codes: Tensor
    bounded: Tensor
    residuals: Tensor
    perplexity: Tensor
    usage: Tensor
    histogram: Tensor


def stage_scales(cfg: ResidualFSQConfig, dtype: torch.dtype, device: torch.device) -> Tensor:
    """`[Q, d]` the scale `s_i = rho ** i` of every stage and feature."""
    ratios = [stage_ratio(level, cfg.preserve_symmetry) for level in cfg.levels]
    scales = [[rho**i for rho in ratios] for i in range(cfg.num_quantizers)]
    return torch.tensor(scales, dtype=dtype, device=device)


def stage_ratio(level: int, symmetric: bool) -> float:
    """`rho = (step / 2) / top` of one feature's grid (see the module's doc)."""
    if symmetric or level % 2:
        return 1.0 / (level - 1)
    return 1.0 / (level - 2)


def stage_sum(index: Tensor, cfg: ResidualFSQConfig, dtype: torch.dtype) -> Tensor:
    """`sum_i s_i * values(index[:, i])` of stage indices `[M, Q, d]`, as `[M, d]`, stage by
    stage in order (the one summation both `quantize_residual` and `dequantize_residual` use)."""
    scales = stage_scales(cfg, dtype, index.device)
    total = level_values(index[:, 0], cfg, dtype) * scales[0]
    for i in range(1, cfg.num_quantizers):
        total = total + level_values(index[:, i], cfg, dtype) * scales[i]
    return total


def quantize_residual(
    x: Tensor, cfg: ResidualFSQConfig, *, mask: Tensor | None = None
) -> tuple[Tensor, ResidualFSQOutput]:
    """Quantize `x` with `cfg.num_quantizers` residual FSQ stages.

    Pure, without parameters: composes with `torch.func.grad`, `torch.func.vmap` and
    `torch.compile(fullgraph=True)`.

    Args:
        x: `[..., F (at cfg.dim), ...]` floating tensor of any rank >= 1 with
            `F = len(cfg.levels)`; may be empty.
        cfg: the static configuration.
        mask: optional `[*B]` tensor (bool or float) over the input's non-feature axes; rows
            at 0 are quantized but excluded from the histogram, perplexity and usage.

    Returns:
        z_q: shaped and typed like `x`: the sum of all stages in the forward pass, with the
            gradient of the bounded values.
        out: a `ResidualFSQOutput`.
    """
    where = "vqfunc.fsq.quantize_residual"
    check_config(cfg, ResidualFSQConfig, where=where)
    _validate.check_input(x, cfg, where=where)
    grouped, layout = to_rows(x.to(compute_dtype(x.dtype)), cfg.dim, 1)
    row_mask = _row_mask(mask, layout, x, where=where)
    bounded, index = bound(grouped[:, 0], cfg)
    scales = stage_scales(cfg, bounded.dtype, bounded.device)
    residual = bounded.detach() - level_values(index, cfg, bounded.dtype)
    indices, residuals = [index], [bounded.detach(), residual]
    for i in range(1, cfg.num_quantizers):
        index = grid_round(residual / scales[i], cfg)
        residual = residual - level_values(index, cfg, bounded.dtype) * scales[i]
        indices.append(index)
        residuals.append(residual)
    stacked = torch.stack(indices, 1)  # [M, Q, d]
    total = stage_sum(stacked, cfg, bounded.dtype)
    codes = indices_to_codes(stacked, cfg)  # [M, Q]
    histogram = grid_histogram(codes, cfg.codebook_size, row_mask, per_part=True)
    batch = layout.batch_shape
    output = ResidualFSQOutput(
        codes=codes.reshape(*batch, cfg.num_quantizers),
        bounded=rows_to_batch(bounded.unsqueeze(1), layout),
        residuals=torch.stack(residuals, 1).reshape(
            *batch, cfg.num_quantizers + 1, cfg.feature_size
        ),
        perplexity=perplexity(histogram).mean(),
        usage=usage(histogram).mean(),
        histogram=histogram,
    )
    z_q = from_rows(straight_through(total, bounded).unsqueeze(1), layout)
    return z_q.to(x.dtype), output


def dequantize_residual(
    codes: Tensor, cfg: ResidualFSQConfig, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The sum over stages of the codes' scaled grid vectors, in the input layout.

    `dequantize_residual(out.codes, cfg, dtype=x.dtype)` equals the forward value of
    `quantize_residual`'s `z_q`, bit for bit.

    Args:
        codes: `[*B, Q]` integer codes, one per stage.
        cfg: the static configuration.
        dtype: floating dtype of the result.

    Returns:
        `[..., F (at cfg.dim), ...]` tensor of rank `len(B) + 1`.
    """
    where = "vqfunc.fsq.dequantize_residual"
    check_config(cfg, ResidualFSQConfig, where=where)
    _check_codes(codes, cfg.num_quantizers, "num_quantizers", where=where)
    if cfg.num_quantizers == 1 and (codes.ndim == 0 or codes.shape[-1] != 1):
        raise ValueError(
            f"{where}: codes must have a trailing axis of size num_quantizers=1 (one code per "
            f"stage), got shape {tuple(codes.shape)}"
        )
    _check_dtype(dtype, where=where)
    batch = tuple(codes.shape[:-1])
    dim = normalize_dim(cfg.dim, len(batch) + 1, where=where, name="cfg.dim")
    index = codes_to_indices(codes.reshape(-1, cfg.num_quantizers), cfg)
    total = stage_sum(index, cfg, compute_dtype(dtype))
    return from_rows(total.unsqueeze(1), Layout(batch, dim)).to(dtype)
