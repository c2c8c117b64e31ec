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
besides its outputs.

Forward and backward are the custom operators `vqfunc::straight_through_forward` and
`vqfunc::straight_through_backward` (like the search in `vqfunc/_search.py`), each with a fake
implementation (shapes for `torch.compile`), a vmap rule (one call per batch element, so `vmap`
gives the numbers of eager calls bit for bit) and an autograd formula; the backward's own
formula (the double backward, `create_graph=True`) is written in differentiable torch ops.
Inside each operator the backend policy (`vqfunc._kernels.policy`) chooses:

- for float32 CPU tensors, the compiled kernels of `_straight_through_cpu`: one pass over the
  rows forward (outputs and loss) and one backward (both gradients, the codebook's
  scatter-added per thread);
- everywhere else torch: the loss is summed and its gradients formed a chunk of rows at a time,
  the codebook gradient accumulated with one `index_put` per chunk.

Eager calls, `torch.func.grad`, `vmap`, `functional_call` and `torch.compile(fullgraph=True)`
therefore all run the same implementation, and tensor subclasses reach the dispatcher.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vqfunc._kernels import policy as _policy
from vqfunc._kernels import straight_through_cpu as _straight_through_cpu
from vqfunc._kernels.transforms import (
    plain_eager,
    traced_or_transformed,
    transformed_not_traced,
)


def _chunk_rows(z: Tensor) -> int:
    # Rows of one chunk: `settings().chunk_elements` elements (a float32 temporary of the
    # default 2**20 is 4 MiB).
    return max(1, _policy.settings().chunk_elements // max(z.shape[1], 1))


def _chunks(z: Tensor) -> range:
    return range(0, z.shape[0], _chunk_rows(z))


def _loss_count(z: Tensor, weights: Tensor | None) -> Tensor | float:
    """The number of (weighted) elements the mean divides by; at least 1."""
    if weights is None:
        return float(max(z.shape[0] * z.shape[1], 1))
    return torch.clamp(weights.sum() * z.shape[1], min=1.0)


def _kernel_takes(codes: Tensor, *tensors: Tensor | None) -> bool:
    return _straight_through_cpu.applies(codes, *tensors)


def _loss_dtype(z: Tensor, codebook: Tensor) -> torch.dtype:
    return torch.promote_types(z.dtype, codebook.dtype)


@torch.library.custom_op("vqfunc::straight_through_forward", mutates_args=())
def _forward_op(
    z: Tensor, codebook: Tensor, codes: Tensor, weights: Tensor | None, beta: float, nu: float
) -> tuple[Tensor, Tensor, Tensor]:
    """`(codebook[codes], codebook[codes], loss)`; `beta` and `nu` only shape the backward."""
    z, codebook = z.resolve_neg(), codebook.resolve_neg()
    if _kernel_takes(codes, z, codebook, weights):
        out, z_q, total = _straight_through_cpu.forward(z, codebook, codes, weights)
        return out, z_q, total / _loss_count(z, weights)
    out = codebook.index_select(0, codes)
    total = z.new_zeros((), dtype=_loss_dtype(z, codebook))
    step = _chunk_rows(z)
    for start in _chunks(z):
        stop = start + step
        squared = (z[start:stop] - out[start:stop]).square()
        if weights is None:
            total = total + squared.sum()
        else:
            total = total + (squared.sum(-1) * weights[start:stop]).sum()
    return out, out.clone(), (total / _loss_count(z, weights)).to(_loss_dtype(z, codebook))


@_forward_op.register_fake
def _(
    z: Tensor, codebook: Tensor, codes: Tensor, weights: Tensor | None, beta: float, nu: float
) -> tuple[Tensor, Tensor, Tensor]:
    shape = (codes.shape[0], codebook.shape[1])
    return (
        codebook.new_empty(shape),
        codebook.new_empty(shape),
        z.new_empty((), dtype=_loss_dtype(z, codebook)),
    )


def _backward_impl(
    z: Tensor,
    codebook: Tensor,
    codes: Tensor,
    weights: Tensor | None,
    grad_out: Tensor | None,
    grad_z_q: Tensor | None,
    grad_loss: Tensor | None,
    beta: float,
    nu: float,
    need_z: bool,
    need_codebook: bool,
) -> tuple[Tensor, Tensor]:
    """The gradients of z and of the codebook (each empty when not needed)."""
    z, codebook = z.resolve_neg(), codebook.resolve_neg()
    grad_z, grad_codebook = _backward_values(
        z, codebook, codes, weights, grad_out, grad_z_q, grad_loss, beta, nu, need_z, need_codebook
    )
    inputs = [t for t in (grad_out, grad_z_q) if t is not None]
    results = []
    for grad, like, needed in ((grad_z, z, need_z), (grad_codebook, codebook, need_codebook)):
        if not needed or grad is None:
            results.append(like.new_empty(0))
            continue
        grad = grad.to(like.dtype)
        # A custom op's outputs may not alias its inputs (a lone `grad_out` passed through).
        if any(grad.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in inputs):
            grad = grad.clone()
        results.append(grad)
    return results[0], results[1]


_backward_op = torch.library.custom_op("vqfunc::straight_through_backward", mutates_args=())(
    _backward_impl
)


@_backward_op.register_fake
def _(
    z: Tensor,
    codebook: Tensor,
    codes: Tensor,
    weights: Tensor | None,
    grad_out: Tensor | None,
    grad_z_q: Tensor | None,
    grad_loss: Tensor | None,
    beta: float,
    nu: float,
    need_z: bool,
    need_codebook: bool,
) -> tuple[Tensor, Tensor]:
    return (
        torch.empty_like(z) if need_z else z.new_empty(0),
        torch.empty_like(codebook) if need_codebook else codebook.new_empty(0),
    )


def _backward_values(
    z: Tensor,
    codebook: Tensor,
    codes: Tensor,
    weights: Tensor | None,
    grad_out: Tensor | None,
    grad_z_q: Tensor | None,
    grad_loss: Tensor | None,
    beta: float,
    nu: float,
    need_z: bool,
    need_codebook: bool,
) -> tuple[Tensor | None, Tensor | None]:
    # With diff = w (z - z_q): d loss / d z = 2 (1 - beta) diff / count and
    # d loss / d z_q = -2 beta diff / count.
    scale = None if grad_loss is None else 2.0 * grad_loss / _loss_count(z, weights)
    if scale is not None and _kernel_takes(codes, z, codebook, weights, grad_out, grad_z_q, scale):
        scale_value = scale.item()  # a CPU scalar: no device sync
        return _straight_through_cpu.backward(
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
    return grad_z, grad_codebook


def _setup_forward(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    z, codebook, codes, weights, beta, nu = inputs
    ctx.save_for_backward(z, codebook, codes, weights)
    ctx.beta, ctx.nu = beta, nu
    # Unused outputs get no gradient (None) rather than an `R x d` tensor of zeros.
    ctx.set_materialize_grads(False)


def backward_route(*tensors: Tensor | None) -> Any:
    """What a backward formula calls for the straight-through backward of `tensors` (the
    operator's arguments): the transform Function under a `torch.func` transform; the
    implementation itself in a plain eager backward that builds no graph (no double backward
    to record, so no dispatch to pay); the operator otherwise (where `torch.compile` traces
    the backward, whose tracer does not take an autograd.Function nested in another's
    backward, and where a double backward goes through its autograd formula)."""
    if transformed_not_traced():
        return _Backward.apply
    if not torch.is_grad_enabled() and plain_eager(*(t for t in tensors if t is not None)):
        return _backward_impl
    return _backward_op


def _forward_backward(
    ctx: Any, grad_out: Tensor | None, grad_z_q: Tensor | None, grad_loss: Tensor | None
) -> tuple[Any, ...]:
    z, codebook, codes, weights = ctx.saved_tensors
    need_z, need_codebook = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
    if not (need_z or need_codebook):
        return None, None, None, None, None, None
    tensors = (z, codebook, codes, weights, grad_out, grad_z_q, grad_loss)
    grad_z, grad_codebook = backward_route(*tensors)(
        *tensors, *(ctx.beta, ctx.nu, need_z, need_codebook)
    )
    return (
        grad_z if need_z else None,
        grad_codebook if need_codebook else None,
        *(None, None, None, None),
    )


_forward_op.register_autograd(_forward_backward, setup_context=_setup_forward)


def _setup_backward(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    z, codebook, codes, weights, grad_out, grad_z_q, grad_loss, beta, nu, need_z, need_cb = inputs
    ctx.save_for_backward(z, codebook, codes, weights, grad_loss)
    ctx.beta, ctx.nu, ctx.need_z, ctx.need_codebook = beta, nu, need_z, need_cb
    ctx.has_grad_out, ctx.has_grad_z_q = grad_out is not None, grad_z_q is not None
    ctx.set_materialize_grads(False)


def _backward_backward(
    ctx: Any, up_z: Tensor | None, up_codebook: Tensor | None
) -> tuple[Any, ...]:
    """The double backward (`create_graph=True`), in differentiable torch ops.

    As autograd differentiates the unfused composition (`commitment_loss` stops the gradient of
    `z_q` in its first term and of `z` in its second): the backward is `grad_z = g + (1 - beta)
    s w (z - sg(z_q))` and `grad_cb = scatter(-beta s w (sg(z) - z_q) + nu g + g_q)` with
    `s = 2 grad_loss / count`; with upstream `u_z`, `u_cb` and `sel = u_cb[codes]`, its own
    gradients are `d g = u_z + nu sel`, `d g_q = sel`, `d grad_loss = 2 / count sum(w diff U)`
    with `U = (1 - beta) u_z - beta sel`, `d z = (1 - beta) s w u_z` and
    `d codebook = scatter(beta s w sel)`.
    """
    z, codebook, codes, weights, grad_loss = ctx.saved_tensors
    beta, nu = ctx.beta, ctx.nu
    u_z = up_z if ctx.need_z and up_z is not None else None
    selected = None
    if ctx.need_codebook and up_codebook is not None:
        selected = up_codebook.index_select(0, codes)
    d_grad_out = _combine(((u_z, 1.0), (selected, nu if nu > 0 else None)))
    d_grad_z_q = selected
    d_z = d_codebook = d_grad_loss = None
    upstream = _combine(((u_z, 1.0 - beta if beta != 1.0 else None), (selected, -beta or None)))
    if grad_loss is not None and upstream is not None:
        w = 1.0 if weights is None else weights.unsqueeze(-1)
        count = _loss_count(z, weights)
        diff = z - codebook.index_select(0, codes)
        d_grad_loss = (2.0 / count) * (diff * w * upstream).sum()
        scale = 2.0 * grad_loss / count
        if u_z is not None and beta != 1.0:
            d_z = ((1.0 - beta) * scale) * w * u_z
        if selected is not None and beta != 0.0:
            rows = (beta * scale) * w * selected
            d_codebook = torch.zeros_like(codebook).index_add(0, codes, rows)
    return (
        d_z,
        d_codebook,
        None,
        None,
        d_grad_out if ctx.has_grad_out else None,
        d_grad_z_q if ctx.has_grad_z_q else None,
        d_grad_loss,
        *(None, None, None, None),
    )


_backward_op.register_autograd(_backward_backward, setup_context=_setup_backward)


def _looped(op: Any) -> Any:
    """A vmap rule that calls `op` once per batch element: the same numbers as eager calls."""

    def rule(info: Any, in_dims: tuple[int | None, ...], *args: Any) -> tuple[Any, Any]:
        moved = [
            a if d is None or a is None else a.movedim(d, 0)
            for a, d in zip(args, in_dims, strict=True)
        ]
        pairs = list(zip(moved, in_dims, strict=True))
        results = [
            op(*(a if d is None or a is None else a[i] for a, d in pairs))
            for i in range(info.batch_size)
        ]
        outputs = tuple(torch.stack(list(parts)) for parts in zip(*results, strict=True))
        return outputs, (0,) * len(outputs)

    return rule


torch.library.register_vmap("vqfunc::straight_through_forward", _looped(_forward_op))
torch.library.register_vmap("vqfunc::straight_through_backward", _looped(_backward_op))


# The operators' `register_autograd` formulas serve eager autograd and `torch.compile`, but
# `torch.func` transforms (`grad`, `vjp`, `jacrev`) need an autograd.Function with
# `setup_context` around them: these two call the operators and share the same formulas, and
# their generated vmap rules run the operators' own vmap rules.
class _StraightThrough(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(
        z: Tensor, codebook: Tensor, codes: Tensor, weights: Tensor | None, beta: float, nu: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        return _forward_op(z, codebook, codes, weights, beta, nu)

    setup_context = staticmethod(_setup_forward)
    backward = staticmethod(_forward_backward)


class _Backward(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(*args: Any) -> tuple[Tensor, Tensor]:
        return _backward_op(*args)

    setup_context = staticmethod(_setup_backward)
    backward = staticmethod(_backward_backward)


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
    args = (z, codebook, codes, weights, float(beta), float(nu))
    return _StraightThrough.apply(*args) if traced_or_transformed() else _forward_op(*args)
