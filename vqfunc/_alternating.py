"""Alternating optimisation: a codebook step on its own loss before the task step.

The codebook loss is `mse(sg(z), C'[q])` with the assignments `q` of the forward pass
(`C'` the effective codebook, normalised for cosine), i.e. the commitment loss with
`beta = 1`. `alternating_step` takes one plain gradient step of it on the raw codebook; the
layer shim's `inplace_optimizer` does the same with any `torch.optim` optimizer (vqtorch's
convenience, e.g. `lambda p: torch.optim.SGD(p, lr=50.0, momentum=0.9)`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vqfunc import _validate
from vqfunc._config import VQConfig
from vqfunc._losses import commitment_loss
from vqfunc._params import VQParams
from vqfunc._quantize import code_vectors


def codebook_loss(
    params: VQParams, z: Tensor, codes: Tensor, cfg: VQConfig, *, mask: Tensor | None = None
) -> Tensor:
    """`mse(sg(z), C'[codes])`: how far the assigned codes are from their inputs.

    Differentiable with respect to `params` (codebook and affine parameters), not `z`.

    Args:
        params: the params to score.
        z: `[*B, F]` the searched vectors, `QuantizeOutput.z`.
        codes: `[*B]` (or `[*B, G]`) their codes, `QuantizeOutput.codes`.
        cfg: the static configuration.
        mask: optional `[*B]` mask; masked rows do not count.

    Returns:
        A scalar: the mean over the unmasked elements (0 for an empty batch).
    """
    _validate.check_code_range(codes, cfg.codes_per_book, where="codebook_loss")
    rows = z.detach().reshape(-1, cfg.groups, cfg.code_dim)
    row_codes = codes.reshape(-1, cfg.groups).long()
    z_q = code_vectors(params, row_codes, cfg, rows.dtype)
    row_mask = None if mask is None else mask.reshape(-1, 1).expand(row_codes.shape)
    return commitment_loss(rows, z_q, 1.0, mask=row_mask)


def alternating_step(
    params: VQParams,
    z: Tensor,
    codes: Tensor,
    cfg: VQConfig,
    *,
    lr: float,
    mask: Tensor | None = None,
) -> VQParams:
    """One gradient-descent step of `codebook_loss` on the raw codebook.

    `codebook <- codebook - lr * d codebook_loss / d codebook`; the affine parameters are
    unchanged (as with vqtorch's in-place optimizer, which holds the codebook only).

    Args:
        params: current params.
        z: `[*B, F]` `QuantizeOutput.z` of the forward pass.
        codes: `QuantizeOutput.codes` of the same pass (the assignments are kept).
        cfg: the static configuration.
        lr: step size.
        mask: optional `[*B]` mask; masked rows do not count.

    Returns:
        New params.
    """
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr >= 0:
        raise ValueError(f"alternating_step: lr must be a number >= 0, got {lr!r}")

    def loss_of(codebook: Tensor) -> Tensor:
        return codebook_loss(params._replace(codebook=codebook), z, codes, cfg, mask=mask)

    grad = torch.func.grad(loss_of)(params.codebook)
    return params._replace(codebook=params.codebook - lr * grad)
