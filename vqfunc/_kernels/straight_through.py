"""The straight-through quantizer output and its commitment loss, fused.

`straight_through_with_loss(z, codebook, codes, beta, nu, weights)` computes, for rows
`z [R, d]` and their selected codes `codebook[codes]`, in one autograd node:

- the straight-through output: value exactly `codebook[codes]`, gradient identity to `z` and,
  with `nu > 0`, `nu` times the gradient to the selected codes (the synchronized update);
- the selected codes `z_q = codebook[codes]`, differentiable with respect to the codebook;
- the commitment loss `(1 - beta) * mse(z, sg(z_q)) + beta * mse(sg(z), z_q)` (a weighted
  mean when `weights` are given).

It gives the values and gradients of the composition of `estimators.straight_through`,
`estimators.synchronized` and `losses.commitment_loss`, but never holds an `R x d` temporary
besides its outputs. Two implementations:

- on plain float32 CPU tensors (eager, grad mode off inside the node) the compiled kernels of
  `_straight_through_cpu`: one pass over the rows forward (outputs and loss) and one backward
  (both gradients, the codebook's scatter-added per thread);
- everywhere else torch: the loss is summed and its gradients formed a chunk of rows at a time,
  the codebook gradient accumulated with one `index_put` per chunk.

Written with `setup_context` and `generate_vmap_rule=True`, so it composes with
`torch.func.grad`, `vmap`, `jacrev` and `torch.compile(fullgraph=True)` (which see the torch
path), and with double backward (the torch path, which is differentiable, runs whenever the
backward records a graph).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vqfunc._kernels import straight_through_cpu as _straight_through_cpu

# Elements of one chunk of rows: a float32 temporary of 2**20 elements is 4 MiB.
_CHUNK_ELEMENTS = 1 << 20


def _chunk_rows(z: Tensor) -> int:
    return max(1, _CHUNK_ELEMENTS // max(z.shape[1], 1))


def _chunks(z: Tensor) -> range:
    return range(0, z.shape[0], _chunk_rows(z))


def _loss_count(z: Tensor, weights: Tensor | None) -> Tensor | float:
    """The number of (weighted) elements the mean divides by; at least 1."""
    if weights is None:
        return float(max(z.shape[0] * z.shape[1], 1))
    return torch.clamp(weights.sum() * z.shape[1], min=1.0)


class _StraightThroughWithLoss(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(
        z: Tensor, codebook: Tensor, codes: Tensor, weights: Tensor | None, beta: float, nu: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        if _straight_through_cpu.applies(codes, z, codebook, weights):
            out, z_q, total = _straight_through_cpu.forward(z, codebook, codes, weights)
            return out, z_q, total / _loss_count(z, weights)
        out = codebook.index_select(0, codes)
        total = z.new_zeros(())
        step = _chunk_rows(z)
        for start in _chunks(z):
            stop = start + step
            squared = (z[start:stop] - out[start:stop]).square()
            if weights is None:
                total = total + squared.sum()
            else:
                total = total + (squared.sum(-1) * weights[start:stop]).sum()
        return out, out.clone(), total / _loss_count(z, weights)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        z, codebook, codes, weights, beta, nu = inputs
        ctx.save_for_backward(z, codebook, codes, weights)
        ctx.beta = beta
        ctx.nu = nu
        # Unused outputs get no gradient (None) rather than an `R x d` tensor of zeros.
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(
        ctx: Any, grad_out: Tensor | None, grad_z_q: Tensor | None, grad_loss: Tensor | None
    ) -> tuple[Any, ...]:
        z, codebook, codes, weights = ctx.saved_tensors
        beta, nu = ctx.beta, ctx.nu
        need_z, need_codebook = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # With diff = w (z - z_q): d loss / d z = 2 (1 - beta) diff / count and
        # d loss / d z_q = -2 beta diff / count.
        scale = None if grad_loss is None else 2.0 * grad_loss / _loss_count(z, weights)
        if scale is not None and _straight_through_cpu.applies(
            codes, z, codebook, weights, grad_out, grad_z_q, scale
        ):
            scale_value = scale.item()  # a CPU scalar: no device sync
            grad_z, grad_codebook = _straight_through_cpu.backward(
                z,
                codebook,
                codes,
                weights,
                grad_out,
                grad_z_q,
                a_z=(1.0 - beta) * scale_value,
                a_q=-beta * scale_value,
                nu=nu if nu > 0 else 0.0,
                need_z=need_z,
                need_codebook=need_codebook,
            )
            return grad_z, grad_codebook, None, None, None, None
        z_parts = []
        grad_codebook = torch.zeros_like(codebook) if need_codebook else None
        step = _chunk_rows(z)
        for start in _chunks(z):
            stop = start + step
            diff = None
            if scale is not None:
                diff = z[start:stop] - codebook.index_select(0, codes[start:stop])
                if weights is not None:
                    diff = diff * weights[start:stop].unsqueeze(-1)
            g = None if grad_out is None else grad_out[start:stop]
            loss_z = None if scale is None else (1.0 - beta) * scale
            loss_q = None if scale is None else -beta * scale
            if need_z:
                part = _combine(((g, 1.0), (diff, loss_z)))
                z_parts.append(torch.zeros_like(z[start:stop]) if part is None else part)
            g_q = None if grad_z_q is None else grad_z_q[start:stop]
            rows = _combine(((diff, loss_q), (g, nu if nu > 0 else None), (g_q, 1.0)))
            if grad_codebook is not None and rows is not None:
                # `index_put` with accumulation: the same sums as `index_add` in the same row
                # order, several times faster on CPU when many rows share a code.
                grad_codebook = grad_codebook.index_put((codes[start:stop],), rows, accumulate=True)
        grad_z = None
        if need_z:
            if not z_parts:  # an empty batch
                grad_z = torch.zeros_like(z)
            else:
                grad_z = z_parts[0] if len(z_parts) == 1 else torch.cat(z_parts)
        return grad_z, grad_codebook, None, None, None, None


def _combine(terms: tuple[tuple[Tensor | None, Tensor | float | None], ...]) -> Tensor | None:
    """`sum(t * c)` over the pairs whose tensor and coefficient are not None (None if none)."""
    total: Tensor | None = None
    for t, c in terms:
        if t is None or c is None:
            continue
        if total is None:
            total = t if isinstance(c, float) and c == 1.0 else t * c
        elif isinstance(c, Tensor):
            total = torch.addcmul(total, t, c)
        else:
            total = torch.add(total, t, alpha=c)
    return total


def straight_through_with_loss(
    z: Tensor,
    codebook: Tensor,
    codes: Tensor,
    *,
    beta: float,
    nu: float = 0.0,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The straight-through output for `z`, its codes and its commitment loss, fused.

    Args:
        z: `[R, d]` rows (as the search saw them).
        codebook: `[K', d]` the codes the rows index (several codebooks stacked flat, with
            `codes` offset accordingly).
        codes: `[R]` int64 indices into `codebook`.
        beta: weight of the codebook term of the loss, in [0, 1].
        nu: weight of the synchronized update; 0 turns it off.
        weights: optional `[R]` row weights of the loss (not differentiated).

    Returns:
        out: `[R, d]` with value `codebook[codes]`; its gradient reaches `z` as the identity and
            the selected codes times `nu`.
        z_q: `[R, d]` `codebook[codes]`, differentiable with respect to the codebook only (as
            `QuantizeOutput.codewords`, from which users compute their own losses).
        loss: scalar commitment loss; 0 for an empty (or fully masked) batch.
    """
    if weights is not None:
        weights = weights.detach().to(z.dtype)
    return _StraightThroughWithLoss.apply(z, codebook, codes, weights, beta, nu)
