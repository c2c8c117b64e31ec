"""Residual vector quantization: every level quantizes what the earlier levels left.

With `r_0 = z`: `q_i = C_i[argmin_k ||r_{i-1} - C_i[k]||]`, `r_i = r_{i-1} - q_i`, and the
output is `z_q = q_1 + ... + q_L`. Levels run one after the other (each needs the previous
residual); within a level the search is the library's chunked nearest-code search.

The codebooks are laid out like those of a grouped quantizer with one group per level (the
same `CodebookLayout`), so `VQParams`, the affine re-parameterisation and the histograms are
shared with `vqfunc.quantize`:
one `[K, F]` codebook for all levels (`share=True`) or `[L, K / L, F]` (`share=False`, where
`num_codes` counts the codes of all levels together, as in vqtorch).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from vqfunc import _params, _validate
from vqfunc._affine import effective_codebook
from vqfunc._estimators import estimate
from vqfunc._layout import Layout, from_rows, normalize_dim, rows_to_batch, to_rows
from vqfunc._losses import commitment_loss
from vqfunc._metrics import perplexity
from vqfunc._params import VQParams
from vqfunc._quantize import book_histogram, code_vectors, compute_dtype, row_weights, valid_rows
from vqfunc._search import nearest_codes
from vqfunc.residual._config import ResidualConfig


class ResidualOutput(NamedTuple):
    """Everything `vqfunc.residual.quantize` computed besides the quantized tensor.

    With `B` the input's shape without its feature axis and `L = cfg.levels`:

    Attributes:
        codes: `[*B, L]` int64 code of every level. With separate codebooks, level `i`'s code
            indexes that level's codebook (`params.codebook[i]`); vqtorch's flat row index is
            `codes[..., i] + i * cfg.codes_per_book`.
        distances: `[*B, L]` the norm `||r_i||` of the residual left after each level.
        loss: scalar commitment loss between the input and the sum of all levels.
        z: `[*B, F]` the input vectors (zeros for invalid ones).
        codewords: `[*B, F]` the sum of the selected codes of all levels, before the gradient
            estimator (the returned `z_q` carries the estimator); differentiable with respect
            to the codebook.
        residuals: `[*B, L + 1, F]` the residuals `r_0 = z, r_1, ..., r_L = z - z_q`.
        perplexity: scalar code perplexity (mean over codebooks).
        histogram: `[num_books, K]` code counts over all levels (masked and invalid rows
            excluded).
        valid: `[*B]` bool, False for input vectors with a non-finite entry (they count as
            masked).
        num_invalid: scalar int64 count of those vectors (no host sync).
    """

    codes: Tensor
    distances: Tensor
    loss: Tensor
    z: Tensor
    codewords: Tensor
    residuals: Tensor
    perplexity: Tensor
    histogram: Tensor
    valid: Tensor
    num_invalid: Tensor


def init_params(
    cfg: ResidualConfig,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> VQParams:
    """Fresh parameters: standard-normal codebooks and zero raw affine parameters.

    Returns:
        `VQParams` with `codebook` of shape `cfg.codebook_shape` and raw affine parameters of
        shape `[A, F]` (`[L, A, F]` with separate codebooks; `A = 0` when affine is off).
    """
    _validate.check_config(cfg, ResidualConfig, where="vqfunc.residual.init_params")
    return _params.init_params(cfg, generator=generator, device=device, dtype=dtype)


def check_params(params: object, cfg: ResidualConfig, *, where: str) -> None:
    """`cfg` is a `ResidualConfig` and `params` are shaped as it says."""
    _validate.check_params(params, cfg, where=where, kind=ResidualConfig)


def _quantize_levels(
    codebook: Tensor, rows: Tensor, valid: Tensor, cfg: ResidualConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """Rows `[M, F]` through all levels: `(picked [M, L, F], codes [M, L], distances [M, L])`.

    The search sees the residuals without gradient; the picked codes stay differentiable with
    respect to the codebook. Invalid rows (`valid` `[M]` False) take code 0 at every level,
    with distance NaN.
    """
    residual = rows.detach()
    invalid = ~valid
    picked, codes, distances = [], [], []
    for level in range(cfg.levels):
        book = codebook if cfg.share else codebook[level]
        level_codes, level_distances = nearest_codes(residual, book)
        level_codes = level_codes.masked_fill(invalid, 0)
        level_distances = level_distances.masked_fill(invalid, torch.nan)
        code_vectors = book.index_select(0, level_codes)
        residual = residual - code_vectors.detach()
        picked.append(code_vectors)
        codes.append(level_codes)
        distances.append(level_distances)
    return torch.stack(picked, 1), torch.stack(codes, 1), torch.stack(distances, 1)


def quantize(
    params: VQParams, x: Tensor, cfg: ResidualConfig, *, mask: Tensor | None = None
) -> tuple[Tensor, ResidualOutput]:
    """Quantize `x` with `cfg.levels` residual levels.

    Pure: reads `params` and `x`, returns new tensors; composes with `torch.func.grad` and
    `torch.func.functional_call`. The gradient estimator (and the synchronized update) act on
    the sum of the levels, and the loss compares `x` with that sum.

    Args:
        params: codebook(s) and affine parameters, from `vqfunc.residual.init_params`.
        x: `[..., F (at cfg.dim), ...]` floating tensor of any rank >= 1; may be empty.
        cfg: the static configuration.
        mask: optional `[*B]` tensor (bool, or float weights in [0, 1]) over the input's
            non-feature axes; rows at 0 are quantized but excluded from the loss, histogram and
            perplexity. Rows with a non-finite entry are handled as in `vqfunc.quantize`:
            searched as zeros, code 0 at every level, excluded as if masked (`out.valid`).

    Returns:
        z_q: shaped and typed like `x`, the sum of the selected codes of all levels in the
            forward pass, with the gradient of `cfg.estimator` to `x`.
        out: a `ResidualOutput`.
    """
    where = "vqfunc.residual.quantize"
    check_params(params, cfg, where=where)
    _validate.check_input(x, cfg, where=where)
    _validate.check_same_device(x, params, where=where)
    grouped_rows, layout = to_rows(x.to(compute_dtype(x, params)), cfg.dim, groups=1)
    valid = valid_rows(grouped_rows, cosine=False)
    rows = torch.where(valid.unsqueeze(-1), grouped_rows[:, 0], 0.0)
    row_mask = None
    if mask is not None:
        _validate.check_mask(mask, layout.batch_shape, x, where=where)
        row_mask = mask.reshape(-1)
    weights = row_weights(valid, row_mask, rows.dtype)
    codebook = effective_codebook(params, cfg).to(rows.dtype)
    picked, codes, distances = _quantize_levels(codebook, rows, valid, cfg)
    z_q = picked.sum(1)
    loss = commitment_loss(rows, z_q, cfg.beta, mask=weights)
    out_rows = estimate(rows, z_q, cfg)
    histogram = book_histogram(codes, cfg, weights)
    residuals = torch.cat([rows.unsqueeze(1), rows.unsqueeze(1) - picked.cumsum(1)], 1)
    batch = layout.batch_shape
    output = ResidualOutput(
        codes=codes.reshape(*batch, cfg.levels),
        distances=distances.reshape(*batch, cfg.levels),
        loss=loss,
        z=rows_to_batch(rows.unsqueeze(1), layout),
        codewords=rows_to_batch(z_q.unsqueeze(1), layout),
        residuals=residuals.reshape(*batch, cfg.levels + 1, cfg.feature_size),
        perplexity=perplexity(histogram).mean(),
        histogram=histogram,
        valid=valid.view(batch),
        num_invalid=(~valid).sum(),
    )
    return from_rows(out_rows.unsqueeze(1), layout).to(x.dtype), output


def dequantize(params: VQParams, codes: Tensor, cfg: ResidualConfig) -> Tensor:
    """The sum over levels of the codes' vectors, in the input layout.

    `vqfunc.residual.dequantize(params, out.codes, cfg)` equals the forward value of
    `vqfunc.residual.quantize`'s `z_q` (and `out.codewords`, in the input layout).

    Args:
        params: the codebook(s).
        codes: `[*B, L]` integer codes, one per level (indices into the level's own codebook
            with separate codebooks).
        cfg: the static configuration.

    Returns:
        `[..., F (at cfg.dim), ...]` tensor of rank `len(B) + 1` in the params' dtype.
    """
    where = "vqfunc.residual.dequantize"
    check_params(params, cfg, where=where)
    _validate.check_codes(codes, cfg, where=where)
    if codes.device != params.codebook.device:
        raise ValueError(
            f"{where}: codes are on {codes.device} but params.codebook is on "
            f"{params.codebook.device}"
        )
    batch_shape = tuple(codes.shape[:-1])
    dim = normalize_dim(cfg.dim, len(batch_shape) + 1, where=where, name="cfg.dim")
    code_rows = codes.reshape(-1, cfg.levels).long()
    vectors = code_vectors(params, code_rows, cfg)
    return from_rows(vectors.sum(1, keepdim=True), Layout(batch_shape, dim))
