"""Residual lookup-free quantization: every stage quantizes by sign what the earlier left.

With `z` the input (l2-normalised to norm `scale` once, for BSQ), `r_{-1} = z`, stage `i`
takes `q_i = +-s_i` by the sign of `r_{i-1}` with `s_i = cfg.code_scale * 2**-i`, and
`r_i = r_{i-1} - q_i`; `z_q = q_0 + ... + q_{Q-1}`. Each stage has the entropy terms of plain
LFQ on its own input and codes; the loss sums them over the stages and adds one commitment
term `mse(z, sg(z_q))`. The straight-through gradient is applied once, to the sum (as
`vqfunc.residual` applies its estimator to the sum of its levels).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from vqfunc._layout import Layout, from_rows, normalize_dim, rows_to_batch
from vqfunc._metrics import perplexity, usage
from vqfunc._search import search_dtype
from vqfunc.lfq._config import ResidualLFQConfig
from vqfunc.lfq._quantize import (
    batch_terms,
    bits_to_codes,
    check_codes,
    check_config,
    check_dtype,
    codes_to_bits,
    prepare_rows,
    signs,
    weighted_histogram,
)

if TYPE_CHECKING:
    from vqfunc.distributed import ReduceSync


class ResidualLFQOutput(NamedTuple):
    """Everything `vqfunc.lfq.quantize_residual` computed besides the quantized tensor.

    With `B` the input's shape without its feature axis and `Q = cfg.num_quantizers` (batch
    means over the unmasked rows, of every rank under `sync=`):

    Attributes:
        codes: `[*B, Q]` int64 code of every stage, `sum_i 2**i [r_i > 0]`.
        loss: scalar `entropy_weight * sum over stages of (per_sample_entropy -
            diversity_gamma * codebook_entropy) + commitment_weight * commitment`.
        per_sample_entropy: `[Q]` each stage's batch mean of its per-sample entropy (nats).
        codebook_entropy: `[Q]` each stage's codebook entropy (nats).
        commitment: scalar `mse(z, sg(z_q))` between the input and the sum of the stages.
        z: `[*B, bits]` the input vectors as quantized (normalised for BSQ), compute dtype.
        residuals: `[*B, Q + 1, bits]` the remainders `r_{-1} = z, r_0, ..., r_{Q-1} = z - z_q`.
        perplexity: scalar code perplexity (mean over stages; this rank's rows).
        usage: scalar fraction of codes used (mean over stages; this rank's rows).
        histogram: `[Q, 2**bits]` code counts of every stage (this rank's unmasked rows).
    """

    codes: Tensor
    loss: Tensor
    per_sample_entropy: Tensor
    codebook_entropy: Tensor
    commitment: Tensor
    z: Tensor
    residuals: Tensor
    perplexity: Tensor
    usage: Tensor
    histogram: Tensor


def stage_magnitudes(cfg: ResidualLFQConfig) -> list[float]:
    """The code magnitude `s_i = code_scale * 2**-i` of every stage."""
    return [cfg.code_scale * 2.0**-i for i in range(cfg.num_quantizers)]


def stage_sum(positive: Tensor, cfg: ResidualLFQConfig, dtype: torch.dtype) -> Tensor:
    """`sum_i +-s_i` of stage signs `[M, Q, b]` (True for `+`), stage by stage in order (the
    summation both `quantize_residual` and `dequantize_residual` use)."""
    total = None
    for i, magnitude in enumerate(stage_magnitudes(cfg)):
        m = torch.tensor(magnitude, dtype=dtype, device=positive.device)
        value = torch.where(positive[:, i], m, -m)
        total = value if total is None else total + value
    assert total is not None
    return total


def quantize_residual(
    x: Tensor,
    cfg: ResidualLFQConfig,
    *,
    mask: Tensor | None = None,
    sync: ReduceSync | None = None,
) -> tuple[Tensor, ResidualLFQOutput]:
    """Quantize `x` with `cfg.num_quantizers` residual LFQ (or BSQ) stages.

    Pure, without parameters: composes with `torch.func.grad`, `torch.func.vmap` and
    `torch.compile(fullgraph=True)`. Every stage's codebook entropy costs what plain LFQ's
    does (`vqfunc.lfq.quantize`).

    Args:
        x: `[..., F (at cfg.dim), ...]` floating tensor of any rank >= 1 with
            `F = cfg.bits`; may be empty.
        cfg: the static configuration.
        mask: optional `[*B]` tensor (bool or float) over the input's non-feature axes; rows
            at 0 are quantized but excluded from every loss term and statistic.
        sync: as for `vqfunc.lfq.quantize`: the batch sums of all stages are summed over the
            ranks in one collective (`Q * 2**bits + Q + 3` values).

    Returns:
        z_q: shaped and typed like `x`: the sum of the stages' codes in the forward pass, with
            the straight-through gradient to `x`.
        out: a `ResidualLFQOutput`.
    """
    where = "vqfunc.lfq.quantize_residual"
    check_config(cfg, ResidualLFQConfig, where=where)
    z, layout, weights = prepare_rows(x, cfg, mask, where=where)
    magnitudes = stage_magnitudes(cfg)
    residual = z
    inputs, residuals, positive = [], [z.detach()], []
    for magnitude in magnitudes:
        inputs.append(residual)
        positive.append(residual > 0)
        # The remainder passes the gradient to z unchanged: every stage's entropy terms reach it.
        residual = residual - signs(residual, magnitude).detach()
        residuals.append(residual.detach())
    stacked = torch.stack(positive, 1)  # [M, Q, b]
    total = stage_sum(stacked, cfg, z.dtype)
    codes = bits_to_codes(stacked)  # [M, Q]
    commitment_rows = (z - total).square().sum(-1)
    terms = batch_terms(inputs, magnitudes, commitment_rows, weights, cfg, sync)
    loss = (
        cfg.entropy_weight
        * (terms.per_sample_entropy - cfg.diversity_gamma * terms.codebook_entropy).sum()
        + cfg.commitment_weight * terms.commitment
    )
    histogram = weighted_histogram(codes, cfg.codebook_size, weights)
    batch = layout.batch_shape
    output = ResidualLFQOutput(
        codes=codes.reshape(*batch, cfg.num_quantizers),
        loss=loss,
        per_sample_entropy=terms.per_sample_entropy,
        codebook_entropy=terms.codebook_entropy,
        commitment=terms.commitment,
        z=rows_to_batch(z.unsqueeze(1), layout),
        residuals=torch.stack(residuals, 1).reshape(*batch, cfg.num_quantizers + 1, cfg.bits),
        perplexity=perplexity(histogram).mean(),
        usage=usage(histogram).mean(),
        histogram=histogram,
    )
    z_q = total + (z - z.detach())
    return from_rows(z_q.unsqueeze(1), layout).to(x.dtype), output


def dequantize_residual(
    codes: Tensor, cfg: ResidualLFQConfig, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The sum over stages of the codes' vectors, in the input layout.

    `dequantize_residual(out.codes, cfg, dtype=x.dtype)` equals the forward value of
    `quantize_residual`'s `z_q`, bit for bit.

    Args:
        codes: `[*B, Q]` integer codes, one per stage.
        cfg: the static configuration.
        dtype: floating dtype of the result.

    Returns:
        `[..., bits (at cfg.dim), ...]` tensor of rank `len(B) + 1`.
    """
    where = "vqfunc.lfq.dequantize_residual"
    check_config(cfg, ResidualLFQConfig, where=where)
    check_codes(codes, where=where)
    if codes.ndim == 0 or codes.shape[-1] != cfg.num_quantizers:
        raise ValueError(
            f"{where}: codes must have a trailing axis of size num_quantizers="
            f"{cfg.num_quantizers} (one code per stage), got shape {tuple(codes.shape)}"
        )
    check_dtype(dtype, where=where)
    batch = tuple(codes.shape[:-1])
    dim = normalize_dim(cfg.dim, len(batch) + 1, where=where, name="cfg.dim")
    positive = codes_to_bits(codes.reshape(-1, cfg.num_quantizers), cfg.bits)
    total = stage_sum(positive, cfg, search_dtype(dtype))
    return from_rows(total.unsqueeze(1), Layout(batch, dim)).to(dtype)
