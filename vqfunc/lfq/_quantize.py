"""Lookup-free and binary spherical quantization: `quantize`, `dequantize`, the codebook.

`z` is the input vector (l2-normalised to norm `scale` for BSQ); each feature is quantized by
its sign, `q_i = s` if `z_i > 0` else `-s` (`s = cfg.code_scale`), and the code is
`sum_i 2**i [z_i > 0]`. The forward value of `z_q` is exactly `q` (in the input's dtype); its
gradient is the straight-through identity to `z` (through the normalisation for BSQ).

The loss terms (see `LFQConfig`) are batch means over the unmasked rows; the entropies are
exact and memory-bounded (`vqfunc.lfq._entropy`). Under `torch.distributed` (`sync=`), the
sums behind every batch mean (the code mass of the codebook entropy, the per-sample entropy,
the commitment and the row count) are all-reduced in one collective, so every rank computes
the loss of the union of the ranks' batches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vqfunc import _validate
from vqfunc._layout import Layout, from_rows, normalize_dim, rows_to_batch, to_rows
from vqfunc._metrics import perplexity, usage
from vqfunc._search import search_dtype
from vqfunc.lfq._config import LFQConfig, ResidualLFQConfig, _BinaryConfig
from vqfunc.lfq._entropy import bit_entropy, code_mass, codebook_entropy

if TYPE_CHECKING:
    from vqfunc.distributed import ReduceSync


class LFQOutput(NamedTuple):
    """Everything `vqfunc.lfq.quantize` computed besides the quantized tensor.

    With `B` the input's shape without its feature axis (the batch means are over its
    unmasked rows, of every rank under `sync=`):

    Attributes:
        codes: `[*B]` int64 codes `sum_i 2**i [z_i > 0]`, in `[0, 2**bits)`.
        loss: scalar `entropy_weight * (per_sample_entropy - diversity_gamma *
            codebook_entropy) + commitment_weight * commitment`.
        per_sample_entropy: scalar batch mean of the entropy of each vector's code
            distribution (nats).
        codebook_entropy: scalar entropy of the batch mean of the code distributions (nats).
        commitment: scalar `mse(z, sg(z_q))`, a mean over the rows' elements.
        z: `[*B, bits]` the input vectors as quantized (normalised for BSQ), compute dtype.
        perplexity: scalar code perplexity (of this rank's rows).
        usage: scalar fraction of the `2**bits` codes used (of this rank's rows).
        histogram: `[1, 2**bits]` code counts (this rank's unmasked rows).
    """

    codes: Tensor
    loss: Tensor
    per_sample_entropy: Tensor
    codebook_entropy: Tensor
    commitment: Tensor
    z: Tensor
    perplexity: Tensor
    usage: Tensor
    histogram: Tensor


class BatchTerms(NamedTuple):
    """The batch means of a quantizer with `S` entropy stages (one for plain LFQ)."""

    per_sample_entropy: Tensor  # [S]
    codebook_entropy: Tensor  # [S]
    commitment: Tensor  # scalar


def check_config(cfg: object, expected: type[_BinaryConfig], *, where: str) -> None:
    """`cfg` is an `expected` configuration, with a hint for the other LFQ form."""
    if type(cfg) is expected:
        return
    hint = ""
    if isinstance(cfg, ResidualLFQConfig):
        hint = " (for a ResidualLFQConfig use vqfunc.lfq.quantize_residual)"
    elif isinstance(cfg, LFQConfig):
        hint = " (for an LFQConfig use vqfunc.lfq.quantize)"
    raise TypeError(
        f"{where}: cfg must be a vqfunc.lfq.{expected.__name__} (e.g. "
        f"{expected.__name__}(bits=10, dim=-1)), got {type(cfg).__name__}{hint}"
    )


def prepare_rows(
    x: Tensor, cfg: _BinaryConfig, mask: Tensor | None, *, where: str
) -> tuple[Tensor, Layout, Tensor | None]:
    """`x` -> rows `z [M, bits]` in the compute dtype (normalised for BSQ), the layout, and
    the row weights `[M]` of `mask` (None without a mask)."""
    _validate.check_input(x, cfg, where=where)
    rows, layout = to_rows(x.to(search_dtype(x.dtype)), cfg.dim, 1)
    z = rows[:, 0]
    if cfg.spherical:
        z = F.normalize(z, dim=-1) * cfg.scale
    weights = None
    if mask is not None:
        _validate.check_mask(mask, layout.batch_shape, x, where=where)
        weights = mask.reshape(-1).to(z.dtype)
    return z, layout, weights


def signs(z: Tensor, magnitude: Tensor | float) -> Tensor:
    """`+magnitude` where `z > 0`, else `-magnitude`."""
    positive = torch.as_tensor(magnitude, dtype=z.dtype, device=z.device)
    return torch.where(z > 0, positive, -positive)


def bits_to_codes(z: Tensor) -> Tensor:
    """`[M, b]` -> `[M]` int64 `sum_i 2**i [z_i > 0]`."""
    powers = torch.ones(z.shape[-1], dtype=torch.int64, device=z.device).cumsum(0) - 1
    return ((z > 0).long() << powers).sum(-1)


def codes_to_bits(codes: Tensor, bits: int) -> Tensor:
    """`[...]` -> `[..., b]` bool: bit `i` of each code."""
    shifts = torch.arange(bits, device=codes.device)
    return ((codes.long().unsqueeze(-1) >> shifts) & 1).bool()


def batch_terms(
    stage_inputs: list[Tensor],
    magnitudes: list[float],
    commitment_rows: Tensor,
    weights: Tensor | None,
    cfg: _BinaryConfig,
    sync: ReduceSync | None,
) -> BatchTerms:
    """The entropy terms of every stage and the commitment, as batch means.

    Args:
        stage_inputs: `S` tensors `[M, b]`, what each stage quantizes by sign.
        magnitudes: the code magnitude of each stage.
        commitment_rows: `[M]` per-row sum of squared errors `||z - sg(z_q)||^2`.
        weights: optional `[M]` row weights.
        cfg: the configuration (its inverse temperature).
        sync: `reduce_sum` over the ranks, or None.

    The local sums are all-reduced (one collective) and divided by the total weight `W`.
    Each mean's value is the global one; its gradient to this rank's rows is `world / W` per
    row, `world` times the global mean's gradient, so that the gradient averaging of
    DistributedDataParallel gives the global loss's gradient.
    """
    logits = [
        4.0 * cfg.inv_temperature * m * z for z, m in zip(stage_inputs, magnitudes, strict=True)
    ]
    first = logits[0]
    if weights is None:
        count = first.new_tensor(float(first.shape[0]))
        entropy_sums = torch.stack([bit_entropy(a).sum() for a in logits])
        commitment_sum = commitment_rows.sum()
    else:
        count = weights.sum()
        entropy_sums = torch.stack([(bit_entropy(a) * weights).sum() for a in logits])
        commitment_sum = (commitment_rows * weights).sum()
    masses = torch.stack([code_mass(a, weights) for a in logits])  # [S, 2**b]
    stats = torch.cat(
        [
            count.reshape(1),
            entropy_sums.detach(),
            commitment_sum.detach().reshape(1),
            first.new_ones(1),
        ]
    )
    if sync is not None:
        masses, stats = sync.reduce_sum(masses, stats)
    total, world = stats[0], stats[-1]
    stages = len(logits)
    denom = torch.where(total > 0, total, torch.ones_like(total))
    row_scale = world / denom

    def batch_mean(local: Tensor, global_sum: Tensor) -> Tensor:
        # Value: the global mean; gradient: `row_scale` per unit of the local sum.
        return (global_sum / denom).detach() + row_scale * (local - local.detach())

    mean = masses / denom
    codebook = torch.stack(
        [codebook_entropy(a, weights, mean[s], row_scale) for s, a in enumerate(logits)]
    )
    return BatchTerms(
        per_sample_entropy=batch_mean(entropy_sums, stats[1 : 1 + stages]),
        codebook_entropy=codebook,
        commitment=batch_mean(commitment_sum, stats[1 + stages]) / cfg.bits,
    )


def weighted_histogram(codes: Tensor, size: int, weights: Tensor | None) -> Tensor:
    """Float32 counts `[P, size]` of row codes `[M, P]`, one row per part (stage)."""
    ones = torch.ones(codes.shape, device=codes.device)
    if weights is not None:
        ones = ones * weights.to(torch.float32).unsqueeze(-1)
    parts = codes.shape[-1]
    offsets = torch.arange(parts, device=codes.device) * size
    flat = ones.new_zeros(parts * size).scatter_add(
        0, (codes + offsets).reshape(-1), ones.reshape(-1)
    )
    return flat.view(parts, size)


def quantize(
    x: Tensor,
    cfg: LFQConfig,
    *,
    mask: Tensor | None = None,
    sync: ReduceSync | None = None,
) -> tuple[Tensor, LFQOutput]:
    """Quantize every feature of `x` by its sign, with the entropy and commitment terms.

    Pure, without parameters: composes with `torch.func.grad`, `torch.func.vmap` and
    `torch.compile(fullgraph=True)` (masks included). The codebook entropy costs
    `N * 2**bits` multiply-adds forward and twice that backward, in memory bounded by
    `2**bits` plus one chunk (never `N x 2**bits`; see the documentation's LFQ page).

    Args:
        x: `[..., F (at cfg.dim), ...]` floating tensor of any rank >= 1 with
            `F = cfg.bits`; may be empty.
        cfg: the static configuration.
        mask: optional `[*B]` tensor (bool or float) over the input's non-feature axes; rows
            at 0 are quantized but excluded from every loss term and statistic.
        sync: under torch.distributed, `vqfunc.distributed.sync_for(group)` (anything with
            `reduce_sum`): the batch sums of the loss terms are summed over the ranks (one
            collective per call, `2**bits + 4` values), so that every rank computes the loss
            of the union of the batches. Each rank's rows then get `world_size` times that
            loss's gradient, which DistributedDataParallel's averaging turns into the union
            loss's gradient. The histogram, perplexity and usage stay this rank's. None (the
            default): no collective.

    Returns:
        z_q: shaped and typed like `x`: the codes' values (`+-cfg.code_scale`) in the forward
            pass, with the straight-through gradient to `x`.
        out: an `LFQOutput`.
    """
    where = "vqfunc.lfq.quantize"
    check_config(cfg, LFQConfig, where=where)
    z, layout, weights = prepare_rows(x, cfg, mask, where=where)
    q = signs(z, cfg.code_scale)
    codes = bits_to_codes(z)
    terms = batch_terms(
        [z], [cfg.code_scale], (z - q.detach()).square().sum(-1), weights, cfg, sync
    )
    per_sample, codebook = terms.per_sample_entropy[0], terms.codebook_entropy[0]
    loss = (
        cfg.entropy_weight * (per_sample - cfg.diversity_gamma * codebook)
        + cfg.commitment_weight * terms.commitment
    )
    histogram = weighted_histogram(codes.unsqueeze(-1), cfg.codebook_size, weights)
    output = LFQOutput(
        codes=codes.reshape(layout.batch_shape),
        loss=loss,
        per_sample_entropy=per_sample,
        codebook_entropy=codebook,
        commitment=terms.commitment,
        z=rows_to_batch(z.unsqueeze(1), layout),
        perplexity=perplexity(histogram).mean(),
        usage=usage(histogram).mean(),
        histogram=histogram,
    )
    z_q = q + (z - z.detach())
    return from_rows(z_q.unsqueeze(1), layout).to(x.dtype), output


def dequantize(codes: Tensor, cfg: LFQConfig, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """The codes' vectors (`+-cfg.code_scale` per bit) in the input layout.

    `dequantize(out.codes, cfg, dtype=x.dtype)` equals the forward value of `quantize`'s
    `z_q`, bit for bit.

    Args:
        codes: `[*B]` integer codes in `[0, 2**bits)`.
        cfg: the static configuration.
        dtype: floating dtype of the result.

    Returns:
        `[..., bits (at cfg.dim), ...]` tensor of rank `len(B) + 1`.
    """
    where = "vqfunc.lfq.dequantize"
    check_config(cfg, LFQConfig, where=where)
    check_codes(codes, where=where)
    check_dtype(dtype, where=where)
    batch = tuple(codes.shape)
    dim = normalize_dim(cfg.dim, len(batch) + 1, where=where, name="cfg.dim")
    magnitude = torch.tensor(cfg.code_scale, dtype=search_dtype(dtype), device=codes.device)
    values = torch.where(codes_to_bits(codes.reshape(-1), cfg.bits), magnitude, -magnitude)
    return from_rows(values.unsqueeze(1), Layout(batch, dim)).to(dtype)


def implicit_codebook(
    cfg: LFQConfig | ResidualLFQConfig,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """The `[2**bits, bits]` table of every code's vector (row `k` is code `k`); for a residual
    quantizer, that of its first stage (stage `i` scales it by `2**-i`)."""
    if not isinstance(cfg, _BinaryConfig):
        check_config(cfg, LFQConfig, where="vqfunc.lfq.implicit_codebook")
    check_dtype(dtype, where="vqfunc.lfq.implicit_codebook")
    codes = torch.arange(cfg.codebook_size, device=device)
    magnitude = torch.tensor(cfg.code_scale, dtype=search_dtype(dtype), device=codes.device)
    return torch.where(codes_to_bits(codes, cfg.bits), magnitude, -magnitude).to(dtype)


def check_codes(codes: object, *, where: str) -> None:
    if not isinstance(codes, Tensor):
        raise TypeError(f"{where}: codes must be a tensor, got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"{where}: codes must be an integer tensor, got {codes.dtype}")


def check_dtype(dtype: object, *, where: str) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"{where}: dtype must be a floating torch.dtype (e.g. torch.float32), got {dtype!r}"
        )
