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
from vqfunc._params import ResidualParams, VQParams
from vqfunc._quantize import compute_dtype, row_weights
from vqfunc._search import nearest_codes
from vqfunc._validity import valid_rows
from vqfunc.residual._config import ResidualConfig
from vqfunc.residual._grouped import (
    check_grouped_params,
    grouped_dequantize,
    grouped_init_params,
    grouped_quantize,
)
from vqfunc.residual._levels import check_depth, check_level_codes, level_book, level_histogram
from vqfunc.residual._projected import decode, init_projections, projected_levels


class ResidualOutput(NamedTuple):
    """Everything `vqfunc.residual.quantize` computed besides the quantized tensor.

    With `B` the input's shape without its feature axis and `n` the levels that ran
    (`n_levels`, by default `L = cfg.levels`):

    Attributes:
        codes: `[*B, n]` int64 code of every level that ran (no padding for the others).
            With separate codebooks, level `i`'s code indexes that level's codebook
            (`params.codebook[i]`); vqtorch's flat row index is
            `codes[..., i] + i * cfg.codes_per_book`.
        distances: `[*B, n]` the norm `||r_i||` of the residual left after each level.
        loss: scalar commitment loss between the input and the output (the sum of each row's
            first `depth` levels).
        z: `[*B, F]` the input vectors (zeros for invalid ones).
        codewords: `[*B, F]` the sum of the selected codes of each row's first `depth`
            levels, before the gradient
            estimator (the returned `z_q` carries the estimator); differentiable with respect
            to the codebook.
        residuals: `[*B, n + 1, F]` the residuals `r_0 = z, r_1, ..., r_n` of the full chain
            of `n` levels (`r_n = z - z_q` without dropout).
        perplexity: scalar code perplexity (mean over the codebooks of the levels that ran).
        histogram: `[num_books, K]` code counts over the levels that ran (masked and invalid
            rows, and levels a row's `depth` drops, excluded; the padding of per-level sizes
            stays 0).
        valid: `[*B]` bool, False for input vectors with a non-finite entry (they count as
            masked).
        num_invalid: scalar int64 count of those vectors (no host sync).
        depth: `[*B]` int64 number of levels each row's output sums (`n` without dropout).

    With `G = cfg.channel_groups > 1` (grouped residual VQ) the per-group fields gain a group
    axis: `codes` and `distances` `[*B, G, n]`, `residuals` `[*B, G, n + 1, F / G]`,
    `histogram` `[G, num_books, K]`; `loss` and `perplexity` are the means over the groups,
    and `z`, `codewords`, `valid`, `num_invalid`, `depth` keep their shapes.
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
    depth: Tensor


def init_params(
    cfg: ResidualConfig,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> VQParams | ResidualParams:
    """Fresh parameters: standard-normal codebooks and zero raw affine parameters.

    Returns:
        `VQParams` with `codebook` of shape `cfg.codebook_shape` and raw affine parameters of
        shape `[A, d]` (`[L, A, d]` with separate codebooks; `A = 0` when affine is off). With
        `cfg.codebook_dim` a `ResidualParams`, whose projections are normal with variance
        `1 / fan_in` and biases zero. With `cfg.channel_groups = G > 1`, the params of the `G`
        groups' stacks (`cfg.group_config`), drawn one after the other and stacked on a
        leading axis `G`.
    """
    _validate.check_config(cfg, ResidualConfig, where="vqfunc.residual.init_params")
    if cfg.channel_groups > 1:
        return grouped_init_params(
            init_params, cfg, generator=generator, device=device, dtype=dtype
        )
    params = _params.init_params(cfg, generator=generator, device=device, dtype=dtype)
    if cfg.codebook_dim is None:
        return params
    projections = init_projections(cfg, generator, params.codebook.device, params.codebook.dtype)
    return ResidualParams(*params, **projections)


def check_params(params: object, cfg: ResidualConfig, *, where: str) -> None:
    """`cfg` is a `ResidualConfig` and `params` (a `VQParams`, a `ResidualParams` with
    `cfg.codebook_dim`) are shaped as it says."""
    if isinstance(cfg, ResidualConfig) and cfg.channel_groups > 1:
        check_grouped_params(params, cfg, where=where)
        return
    _validate.check_params(params, cfg, where=where, kind=ResidualConfig)


def _quantize_levels(
    codebook: Tensor, rows: Tensor, valid: Tensor, cfg: ResidualConfig, n: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Rows `[M, F]` through `n` levels: `(picked [M, n, F], codes [M, n], distances [M, n])`.

    The search sees the residuals without gradient; the picked codes stay differentiable with
    respect to the codebook. Invalid rows (`valid` `[M]` False) take code 0 at every level,
    with distance NaN.
    """
    residual = rows.detach()
    invalid = ~valid
    picked, codes, distances = [], [], []
    for level in range(n):
        book = level_book(codebook, level, cfg)
        level_codes, level_distances = nearest_codes(residual, book)
        level_codes = level_codes.masked_fill(invalid, 0)
        level_distances = level_distances.masked_fill(invalid, torch.nan)
        vectors = book.index_select(0, level_codes)
        residual = residual - vectors.detach()
        picked.append(vectors)
        codes.append(level_codes)
        distances.append(level_distances)
    return torch.stack(picked, 1), torch.stack(codes, 1), torch.stack(distances, 1)


def _keep(levels: Tensor, kept: Tensor | None) -> Tensor:
    """Level values `[M, n, F]` with the levels each row drops (`kept` `[M, n]` False) zeroed."""
    if kept is None:
        return levels
    return levels * kept.unsqueeze(-1).to(levels.dtype)


def quantize(
    params: VQParams | ResidualParams,
    x: Tensor,
    cfg: ResidualConfig,
    *,
    mask: Tensor | None = None,
    n_levels: int | None = None,
    depth: Tensor | None = None,
) -> tuple[Tensor, ResidualOutput]:
    """Quantize `x` with the first `n_levels` residual levels (all `cfg.levels` by default).

    Pure: reads `params` and `x`, returns new tensors; composes with `torch.func.grad`,
    `torch.func.vmap` and `torch.compile(fullgraph=True)`. The gradient estimator (and the
    synchronized update) act on the sum of the levels, and the loss compares `x` with that sum.

    With `cfg.channel_groups = G > 1`, `torch.func.vmap` of the ungrouped quantizer over the
    `G` channel groups (each with its own stack; see `docs/codec.md`), codes `[*B, G, n]`.

    With `cfg.codebook_dim` each level searches and learns through its projections (see
    `ResidualConfig.codebook_dim`): the output carries a straight-through gradient per level
    instead of `cfg.estimator` on the sum, and the loss is the sum over levels of the
    commitment loss in the projected space.

    Args:
        params: codebook(s) and affine parameters, from `vqfunc.residual.init_params` (a
            `ResidualParams` with `cfg.codebook_dim`).
        x: `[..., F (at cfg.dim), ...]` floating tensor of any rank >= 1; may be empty.
        cfg: the static configuration.
        mask: optional `[*B]` tensor (bool, or float weights in [0, 1]) over the input's
            non-feature axes; rows at 0 are quantized but excluded from the loss, histogram and
            perplexity. Rows with a non-finite entry are handled as in `vqfunc.quantize`:
            searched as zeros, code 0 at every level, excluded as if masked (`out.valid`).
        n_levels: run only the first `n` levels (a lower bitrate): the codes have `n` entries
            and equal the first `n` of the full codes. A Python int in `[1, cfg.levels]`
            (each value is its own compiled graph); None: all levels.
        depth: quantizer dropout, an integer tensor broadcastable to `[*B]` with values in
            `[1, n]` (from `vqfunc.residual.draw_dropout`): each row's output sums only its
            first `depth` levels. All `n` levels are still searched (static shapes); the
            dropped ones are left out of the output, the loss and the histogram.

    Returns:
        z_q: shaped and typed like `x`, the sum of each row's selected codes in the forward
            pass, with the gradient of `cfg.estimator` to `x`.
        out: a `ResidualOutput`.
    """
    where = "vqfunc.residual.quantize"
    _validate.check_config(cfg, ResidualConfig, where=where)
    if cfg.channel_groups > 1:
        return grouped_quantize(
            quantize, params, x, cfg, mask=mask, n_levels=n_levels, depth=depth, where=where
        )
    check_params(params, cfg, where=where)
    _validate.check_input(x, cfg, where=where)
    _validate.check_same_device(x, params, where=where)
    n = cfg.check_n_levels(n_levels, where=where)
    grouped_rows, layout = to_rows(x.to(compute_dtype(x, params)), cfg.dim, groups=1)
    batch = layout.batch_shape
    if depth is not None:
        depth = check_depth(depth, batch, n, where=where).to(x.device)
    valid = valid_rows(grouped_rows, cosine=False)
    rows = torch.where(valid.unsqueeze(-1), grouped_rows[:, 0], 0.0)
    row_mask = None
    if mask is not None:
        _validate.check_mask(mask, batch, x, where=where)
        row_mask = mask.reshape(-1)
    weights = row_weights(valid, row_mask, rows.dtype)
    codebook = effective_codebook(params, cfg).to(rows.dtype)
    level_weights = weights.unsqueeze(-1).expand(-1, n)
    kept = None
    if depth is None:
        row_depth = torch.full(batch, n, dtype=torch.long, device=x.device)
    else:
        row_depth = depth
        kept = torch.arange(n, device=x.device) < depth.reshape(-1, 1)
        level_weights = level_weights * kept.to(weights.dtype)
    if isinstance(params, ResidualParams):
        outs, picked, codes, distances, loss = projected_levels(
            params, codebook, rows, valid, level_weights, cfg, n
        )
        residuals = torch.cat([rows.unsqueeze(1), rows.unsqueeze(1) - outs.cumsum(1)], 1)
        residuals = residuals.detach()
        out_rows = _keep(outs, kept).sum(1)
        z_q = _keep(picked, kept).sum(1)
    else:
        picked, codes, distances = _quantize_levels(codebook, rows, valid, cfg, n)
        residuals = torch.cat([rows.unsqueeze(1), rows.unsqueeze(1) - picked.cumsum(1)], 1)
        z_q = _keep(picked, kept).sum(1)
        loss = commitment_loss(rows, z_q, cfg.beta, mask=weights)
        out_rows = estimate(rows, z_q, cfg)
    histogram = level_histogram(codes, level_weights, cfg)
    books = histogram if cfg.share else histogram[:n]
    output = ResidualOutput(
        codes=codes.reshape(*batch, n),
        distances=distances.reshape(*batch, n),
        loss=loss,
        z=rows_to_batch(rows.unsqueeze(1), layout),
        codewords=rows_to_batch(z_q.unsqueeze(1), layout),
        residuals=residuals.reshape(*batch, n + 1, cfg.feature_size),
        perplexity=perplexity(books).mean(),
        histogram=histogram,
        valid=valid.view(batch),
        num_invalid=(~valid).sum(),
        depth=row_depth,
    )
    return from_rows(out_rows.unsqueeze(1), layout).to(x.dtype), output


def dequantize(
    params: VQParams | ResidualParams,
    codes: Tensor,
    cfg: ResidualConfig,
    *,
    n_levels: int | None = None,
) -> Tensor:
    """The sum over levels of the codes' vectors, in the input layout.

    `vqfunc.residual.dequantize(params, out.codes, cfg)` equals the forward value of
    `vqfunc.residual.quantize`'s `z_q` (and `out.codewords`, in the input layout), and
    `dequantize(params, full_codes, cfg, n_levels=n)` equals the output of
    `quantize(..., n_levels=n)`: residual codes are a prefix code.

    Args:
        params: the codebook(s).
        codes: `[*B, L]` integer codes, one per level (indices into the level's own codebook
            with separate codebooks), or `[*B, n]` with `n_levels=n`; `[*B, G, L]` (or
            `[*B, G, n]`) with `cfg.channel_groups = G > 1`.
        cfg: the static configuration.
        n_levels: decode only the first `n` levels (of `[*B, L]` codes, or all of `[*B, n]`
            codes); None: all `L` levels (codes must then have `L` entries).

    Returns:
        `[..., F (at cfg.dim), ...]` tensor of rank `len(B) + 1` in the params' dtype.
    """
    where = "vqfunc.residual.dequantize"
    _validate.check_config(cfg, ResidualConfig, where=where)
    if cfg.channel_groups > 1:
        return grouped_dequantize(dequantize, params, codes, cfg, n_levels=n_levels, where=where)
    check_params(params, cfg, where=where)
    codes, n = check_level_codes(codes, cfg, n_levels, where=where)
    if codes.device != params.codebook.device:
        raise ValueError(
            f"{where}: codes are on {codes.device} but params.codebook is on "
            f"{params.codebook.device}"
        )
    batch_shape = tuple(codes.shape[:-1])
    dim = normalize_dim(cfg.dim, len(batch_shape) + 1, where=where, name="cfg.dim")
    code_rows = codes.reshape(-1, n).long()
    codebook = effective_codebook(params, cfg)
    if isinstance(params, ResidualParams):
        vectors = decode(params, codebook, code_rows, cfg).unsqueeze(1)
    elif cfg.share:
        vectors = codebook[code_rows]
    else:
        vectors = codebook[torch.arange(n, device=codebook.device), code_rows]
    return from_rows(vectors.sum(1, keepdim=True), Layout(batch_shape, dim))
