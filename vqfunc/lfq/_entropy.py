"""The entropy terms of lookup-free quantization, exact and memory-bounded.

With `a_i = 4 * beta * s * z_i` the logit of bit `i` (`beta` the inverse temperature, `s` the
code magnitude), the distribution `p(c | z) ∝ exp(-beta ||z - c||^2)` over the `2**b` codes
`c in {-s, s}^b` factorises: bit `i` is 1 with probability `sigmoid(a_i)`, independently.

- **Per-sample entropy**: `H(p(. | z)) = sum_i h(a_i)` with the binary entropy
  `h(a) = log1p(exp(-|a|)) + |a| sigmoid(-|a|)` (no cancellation for large `|a|`): `O(b)`
  per vector, differentiated by autograd.
- **Codebook entropy**: `H(A)`, `A_k = sum_n w_n p_n(k) / sum_n w_n` the batch mean. The bits
  are split into a low half (`b1 = b // 2` bits, `K1 = 2**b1` patterns) and a high half
  (`K2 = 2**(b - b1)`); `p_n(k1 + K1 k2) = P1[n, k1] P2[n, k2]`, each half's table built as
  products of the bits' probabilities (no logarithms), and `A` (as `[K2, K1]`) is accumulated as
  `P2^T (w P1)` over chunks of rows. Memory: `A` (`2**b` values) plus a chunk of
  `rows x (K1 + K2)`; never `N x 2**b`. Time: `N * 2**b` multiply-adds (one matrix product per
  chunk) forward and twice that backward.
- Its gradient, `dH/da_ni = -(w_n / W) sum_k p_n(k) (bit_i(k) - sigmoid(a_ni)) log A_k`, is
  formed in a custom backward by the same factorisation (`E_n = sum_k p_n(k) log A_k` and
  `F_ni = sum_k p_n(k) bit_i(k) log A_k` from two matrix products per chunk), so autograd
  never keeps the chunks' tables.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

# Elements of the per-chunk tables (`rows x (K1 + K2)`); float32: 4 MiB per table.
CHUNK_ELEMENTS = 1 << 20


def bit_entropy(logits: Tensor) -> Tensor:
    """`[..., b] -> [...]`: the entropy (nats) of independent bits with these logits."""
    a = logits.abs()
    return (torch.log1p(torch.exp(-a)) + a * torch.sigmoid(-a)).sum(-1)


def _halves(bits: int) -> tuple[int, int]:
    low = bits // 2
    return low, bits - low


def _rows_per_chunk(bits: int) -> int:
    low, high = _halves(bits)
    return max(1, CHUNK_ELEMENTS // ((1 << low) + (1 << high)))


def _patterns(on: Tensor, off: Tensor) -> Tensor:
    """`[r, h]` probabilities of each bit being 1 (`on`) and 0 (`off`) -> `[r, 2**h]` the
    probability of every pattern, pattern `j` having bit `i` equal to `(j >> i) & 1`.

    Built as the outer product of the tables of the low and the high bits (recursively; a few
    bits by doubling), so that the large table costs one product per entry."""
    h = on.shape[1]
    if h <= 3:
        table = on.new_ones(on.shape[0], 1)
        for i in range(h):
            table = torch.cat([table * off[:, i : i + 1], table * on[:, i : i + 1]], dim=1)
        return table
    low = h // 2
    low_table = _patterns(on[:, :low], off[:, :low])
    high_table = _patterns(on[:, low:], off[:, low:])
    # Pattern `j_low + 2**low * j_high`: the high bits vary slowest.
    return (high_table.unsqueeze(2) * low_table.unsqueeze(1)).reshape(on.shape[0], -1)


def _bit_matrix(h: int, like: Tensor) -> Tensor:
    """`[2**h, h]` with entry `(j, i)` equal to bit `i` of `j`."""
    j = torch.arange(1 << h, device=like.device).unsqueeze(1)
    i = torch.arange(h, device=like.device)
    return ((j >> i) & 1).to(like.dtype)


def _chunk_tables(logits: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor, Tensor]:
    """`(sigmoid(a) [r, b], P1 [r, K1], P2 [r, K2])` of rows `start:stop`."""
    low, _ = _halves(logits.shape[1])
    a = logits[start:stop]
    on, off = torch.sigmoid(a), torch.sigmoid(-a)
    return on, _patterns(on[:, :low], off[:, :low]), _patterns(on[:, low:], off[:, low:])


def code_mass(logits: Tensor, weights: Tensor | None) -> Tensor:
    """`sum_n w_n p_n(k)` for every code `k`, `[2**b]`, chunk by chunk (not differentiated).

    Args:
        logits: `[N, b]` bit logits.
        weights: optional `[N]` row weights (a mask); None weighs every row 1.
    """
    logits = logits.detach()
    bits = logits.shape[1]
    low, high = _halves(bits)
    total = logits.new_zeros(1 << high, 1 << low)
    step = _rows_per_chunk(bits)
    for start in range(0, logits.shape[0], step):
        _, low_table, high_table = _chunk_tables(logits, start, start + step)
        if weights is not None:
            low_table = low_table * weights[start : start + step].unsqueeze(1)
        total = total + high_table.T @ low_table
    return total.reshape(-1)


def entropy_gradient(
    logits: Tensor, weights: Tensor | None, mean: Tensor, entropy: Tensor
) -> Tensor:
    """`-w_n sum_k p_n(k) (bit_i(k) - sigmoid(a_ni)) log A_k` for every row and bit, `[N, b]`:
    `W` times the codebook entropy's gradient to the logits (the caller scales by `1 / W`).

    Args:
        logits: `[N, b]` bit logits.
        weights: optional `[N]` row weights.
        mean: `[2**b]` the batch mean `A` of the code distributions.
        entropy: scalar `H(A)`, which centres `log A` (`sum_k p_n(k) (bit - sigmoid) = 0`, so a
            constant shift of `log A` changes nothing but the rounding).
    """
    bits = logits.shape[1]
    low, high = _halves(bits)
    tiny = torch.finfo(mean.dtype).tiny
    log_mean = (torch.log(torch.clamp(mean, min=tiny)) + entropy).view(1 << high, 1 << low)
    low_bits, high_bits = _bit_matrix(low, logits), _bit_matrix(high, logits)
    parts = []
    step = _rows_per_chunk(bits)
    for start in range(0, logits.shape[0], step):
        on, low_table, high_table = _chunk_tables(logits, start, start + step)
        low_weighted = low_table * (high_table @ log_mean)  # [r, K1]
        high_weighted = high_table * (low_table @ log_mean.T)  # [r, K2]
        expected = low_weighted.sum(1, keepdim=True)  # E_n
        per_bit = torch.cat([low_weighted @ low_bits, high_weighted @ high_bits], dim=1)  # F_ni
        part = on * expected - per_bit
        if weights is not None:
            part = part * weights[start : start + step].unsqueeze(1)
        parts.append(part)
    if not parts:
        return torch.zeros_like(logits)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class _CodebookEntropy(torch.autograd.Function):
    """`H(mean)` in the forward pass; in the backward, `row_scale` times `entropy_gradient`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits: Tensor, weights: Tensor | None, mean: Tensor, row_scale: Tensor) -> Tensor:
        return -torch.special.xlogy(mean, mean).sum()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        logits, weights, mean, row_scale = inputs
        ctx.save_for_backward(logits, weights, mean, row_scale, output)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        logits, weights, mean, row_scale, entropy = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        scale = (grad * row_scale).to(logits.dtype)
        return entropy_gradient(logits, weights, mean, entropy) * scale, None, None, None


def codebook_entropy(
    logits: Tensor, weights: Tensor | None, mean: Tensor, row_scale: Tensor
) -> Tensor:
    """The entropy of `mean` (the batch mean of the code distributions of `logits`' rows),
    differentiable with respect to `logits` with the gradient scaled by `row_scale`.

    Args:
        logits: `[N, b]` bit logits of this process's rows.
        weights: optional `[N]` row weights.
        mean: `[2**b]` the batch mean (over every rank's rows under torch.distributed).
        row_scale: scalar `1 / W` (`W` the total weight), times the number of ranks under
            torch.distributed (see `vqfunc.lfq.quantize`).

    First derivatives only: differentiating the gradient again raises, rather than missing the
    batch mean's own dependence on `logits`.
    """
    return _CodebookEntropy.apply(logits, weights, mean.detach(), row_scale.detach())
