"""`quantize` and `dequantize`: the functional vector quantizer.

The search is written for one codebook and one group (`nearest_codes`); grouped VQ is
`torch.func.vmap` of it over the group axis, with the codebook shared (`in_dims=None`) or
stacked per group (`in_dims=0`). The straight-through estimator (the default) then takes a
fused path: the output and the commitment loss are one chunked node over all groups' rows
(`vqfunc._kernels.straight_through`), which keeps the forward and backward free of `N x F`
temporaries. For Euclidean distances on float32 CPU tensors the whole quantizer is one operator
(`vqfunc._fused_quantize`): the search, then one compiled pass for everything after it.

Degenerate data (the policy, the same on every backend and device). An input vector is
*invalid* when any of its entries is not finite, or, with `dist="cosine"`, when any of its
group sub-vectors has (near) zero norm (`<= 1e-12`, where `F.normalize` stops normalising).
An invalid vector is searched as the zero vector, gets code 0 (in every group) and distance
NaN, its output and `codewords` rows are code 0's vector, no gradient reaches it, and it counts
as masked everywhere: in the loss, the histogram, the perplexity and, through `out.valid`, in
`update_state` (EMA statistics, replacement candidates); `out.num_invalid` counts such vectors
without a host sync. A code with a non-finite entry, and with `dist="cosine"` a zero-norm code,
is never selected.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vqfunc import _validate
from vqfunc._affine import effective_codebook
from vqfunc._config import QuantizerConfig, VQConfig
from vqfunc._estimators import estimate
from vqfunc._fused_quantize import applies as applies_fused
from vqfunc._fused_quantize import fused_quantize
from vqfunc._kernels.straight_through import straight_through_with_loss
from vqfunc._layout import codes_to_batch, codes_to_rows, from_rows, rows_to_batch, to_rows
from vqfunc._losses import commitment_loss
from vqfunc._metrics import perplexity
from vqfunc._params import AnyParams, VQParams
from vqfunc._search import nearest_codes, search_dtype
from vqfunc._validity import MIN_NORM as _MIN_NORM
from vqfunc._validity import valid_rows


class QuantizeOutput(NamedTuple):
    """Everything `quantize` computed besides the quantized tensor.

    With `B` the input's shape without its feature axis and `G = cfg.groups`:

    Attributes:
        codes: `[*B]` int64 code indices (`[*B, G]` when `groups > 1`); with separate
            codebooks, indices into the group's own codebook.
        distances: distances to the selected codes, shaped like `codes` (between normalised
            vectors for cosine).
        loss: scalar commitment loss with `cfg.beta` (masked rows excluded).
        z: `[*B, F]` the input vectors as the search saw them (normalised for cosine; zeros
            for invalid vectors).
        codewords: `[*B, F]` their selected codes, before the gradient estimator (the
            returned `z_q` carries the estimator); differentiable with respect to the codebook.
        perplexity: scalar code perplexity (mean over codebooks).
        histogram: `[num_books, K]` code counts (masked and invalid rows excluded).
        valid: `[*B]` bool, False for the invalid input vectors (non-finite, or zero-norm
            with cosine; see the module's policy), which count as masked.
        num_invalid: scalar int64 count of the invalid input vectors (no host sync; log it).
    """

    codes: Tensor
    distances: Tensor
    loss: Tensor
    z: Tensor
    codewords: Tensor
    perplexity: Tensor
    histogram: Tensor
    valid: Tensor
    num_invalid: Tensor


def row_weights(valid: Tensor, row_mask: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Weights (shaped like `valid`) of the rows that count: the mask's (1 without one) where
    the row is valid, 0 elsewhere."""
    weights = valid.to(dtype)
    return weights if row_mask is None else weights * row_mask.to(dtype)


def _search_space(rows: Tensor, codebook: Tensor, cfg: VQConfig) -> tuple[Tensor, Tensor, Tensor]:
    """`(z, codebook, search codebook)`: for cosine, the unit vectors and codes, and the codes
    the search sees, where a zero-norm code is NaN (never selected)."""
    if cfg.dist != "cosine":
        return rows, codebook, codebook
    norms = codebook.norm(dim=-1, keepdim=True)
    unit = codebook / norms.clamp_min(_MIN_NORM)
    return F.normalize(rows, dim=-1), unit, torch.where(norms > _MIN_NORM, unit, torch.nan)


def _lookup(codebook: Tensor, codes: Tensor, cfg: VQConfig) -> Tensor:
    """The codes' vectors `[M, G, d]` of row codes `[M, G]` in `[K, d]` or `[G, K, d]`."""
    if cfg.share:
        return codebook[codes]
    return codebook[torch.arange(cfg.groups, device=codebook.device), codes]


def compute_dtype(x: Tensor, params: AnyParams) -> torch.dtype:
    """Precision of the quantizer's arithmetic: at least float32, float64 if either is."""
    return search_dtype(torch.promote_types(x.dtype, params.codebook.dtype))


class QuantizedRows(NamedTuple):
    """`quantize_rows`' results on rows `[M, G, d]`; `perplexity` and `num_invalid` are None
    where the caller computes them from `histogram` and `valid`."""

    out: Tensor
    z: Tensor
    codewords: Tensor
    codes: Tensor
    distances: Tensor
    loss: Tensor
    histogram: Tensor
    valid: Tensor
    perplexity: Tensor | None = None
    num_invalid: Tensor | None = None


def quantize_rows(
    params: VQParams, rows: Tensor, cfg: VQConfig, row_mask: Tensor | None = None
) -> QuantizedRows:
    """The quantizer on rows `[M, G, d]` (in the compute dtype), without input checks.

    `out` carries the gradient estimator; invalid rows are handled as the module says. The
    Euclidean straight-through quantizer on float32 CPU rows is one fused operator
    (`vqfunc._fused_quantize`); everything else is composed here from torch operators.
    """
    codebook = effective_codebook(params, cfg).to(rows.dtype)
    scaled = cfg.vector_normalize
    if applies_fused(rows, codebook, estimator=cfg.estimator, dist=cfg.dist, scaled=scaled):
        mask = None if row_mask is None else row_mask.to(rows.dtype)
        fused = fused_quantize(rows, codebook, mask, beta=cfg.beta, nu=cfg.sync_nu)
        return QuantizedRows(
            *(fused.out, fused.z, fused.z_q, fused.codes, fused.distances, fused.loss),
            *(fused.histogram, fused.valid, fused.perplexity, fused.num_invalid),
        )
    valid = valid_rows(rows, cfg.dist == "cosine")
    rows = torch.where(valid.view(-1, 1, 1), rows, 0.0)
    weights = row_weights(valid, row_mask, rows.dtype)
    z, codebook, search_book = _search_space(rows, codebook, cfg)
    search = torch.func.vmap(nearest_codes, in_dims=(1, None if cfg.share else 0), out_dims=1)
    codes, distances = search(z, search_book)
    invalid = ~valid.unsqueeze(-1)
    codes = codes.masked_fill(invalid, 0)
    distances = distances.masked_fill(invalid, torch.nan)
    if cfg.estimator == "ste":
        out, z_q, loss = straight_through_with_loss(
            z.reshape(-1, cfg.code_dim),
            codebook.reshape(-1, cfg.code_dim),
            _flat_codes(codes, cfg),
            beta=cfg.beta,
            nu=cfg.sync_nu,
            weights=_flat_row_weights(weights, codes, z.dtype),
        )
        out, z_q = out.view(z.shape), z_q.view(z.shape)
    else:
        z_q = _lookup(codebook, codes, cfg)
        loss = commitment_loss(z, z_q, cfg.beta, mask=weights.unsqueeze(-1).expand(codes.shape))
        out = estimate(z, z_q, cfg)
    if cfg.vector_normalize:
        out = out * rows.norm(dim=-1, keepdim=True)
    histogram = book_histogram(codes, cfg, weights)
    return QuantizedRows(out, z, z_q, codes, distances, loss, histogram, valid)


def book_histogram(codes: Tensor, cfg: QuantizerConfig, row_mask: Tensor | None = None) -> Tensor:
    """Counts `[num_books, K]` of row codes `[M, G]` (rows weighted by `row_mask` `[M]`)."""
    flat = _flat_codes(codes, cfg)
    if row_mask is None:
        weights = torch.ones(flat.shape, device=codes.device)
    else:
        weights = _flat_row_weights(row_mask, codes, torch.float32)
    counts = weights.new_zeros(cfg.num_books * cfg.codes_per_book).scatter_add(0, flat, weights)
    return counts.view(cfg.num_books, cfg.codes_per_book)


def _flat_codes(codes: Tensor, cfg: QuantizerConfig) -> Tensor:
    """Row codes `[M, G]` -> `[M * G]` indices into the codebooks flattened to `[num_codes, d]`.

    Separate codebooks `[G, K, d]` flatten to `[G * K, d]`, so group `g`'s codes gain `g * K`.
    """
    if not cfg.share:
        parts = torch.arange(cfg.layout.parts, device=codes.device)
        codes = codes + parts * cfg.codes_per_book
    return codes.reshape(-1)


def _flat_row_weights(row_mask: Tensor, codes: Tensor, dtype: torch.dtype) -> Tensor:
    """A row mask `[M]` as weights `[M * G]`, one per row and group, matching `_flat_codes`."""
    return row_mask.to(dtype).unsqueeze(-1).expand(codes.shape).reshape(-1)


def quantize(
    params: VQParams, x: Tensor, cfg: VQConfig, *, mask: Tensor | None = None
) -> tuple[Tensor, QuantizeOutput]:
    """Quantize `x` to its nearest codes.

    Pure: reads `params` and `x`, returns new tensors. Composes with `torch.func.grad`,
    `torch.func.vmap` (e.g. over a stack of param sets) and `torch.compile(fullgraph=True)`.

    Args:
        params: the codebook (and affine parameters), from `init_params` or `layer.params`.
        x: `[..., F (at cfg.dim), ...]` floating tensor of any rank >= 1; may be empty.
        cfg: the static configuration.
        mask: optional `[*B]` tensor (bool, or float weights in [0, 1]) over the input's
            non-feature axes; rows at 0 are quantized but excluded from the loss, histogram and
            perplexity. Invalid rows (non-finite; zero-norm with cosine) are excluded as well.

    Returns:
        z_q: shaped and typed like `x`, the selected codes in the forward pass, with the
            gradient of `cfg.estimator` (straight-through by default) to `x` and, with
            `cfg.sync_nu > 0`, the synchronized update to the codebook.
        out: a `QuantizeOutput`.
    """
    _validate.check_params(params, cfg, where="quantize")
    _validate.check_input(x, cfg, where="quantize")
    _validate.check_same_device(x, params, where="quantize")
    rows, layout = to_rows(x.to(compute_dtype(x, params)), cfg.dim, cfg.groups)
    row_mask = None
    if mask is not None:
        _validate.check_mask(mask, layout.batch_shape, x, where="quantize")
        row_mask = mask.reshape(-1)
    result = quantize_rows(params, rows, cfg, row_mask)
    output = QuantizeOutput(
        codes=codes_to_batch(result.codes, layout, cfg),
        distances=codes_to_batch(result.distances, layout, cfg),
        loss=result.loss,
        z=rows_to_batch(result.z, layout),
        codewords=rows_to_batch(result.codewords, layout),
        perplexity=(
            perplexity(result.histogram).mean() if result.perplexity is None else result.perplexity
        ),
        histogram=result.histogram,
        valid=result.valid.view(layout.batch_shape),
        num_invalid=(~result.valid).sum() if result.num_invalid is None else result.num_invalid,
    )
    return from_rows(result.out, layout).to(x.dtype), output


def dequantize(params: VQParams, codes: Tensor, cfg: VQConfig) -> Tensor:
    """The codes' vectors in the input layout: the inverse of the code lookup of `quantize`.

    `dequantize(params, out.codes, cfg)` equals the forward value of `quantize`'s `z_q`
    (for cosine, the normalised codes; with `vector_normalize=True` the input's norms are not
    recoverable from codes, so the result is the unit-norm codes).

    Args:
        params: the codebook.
        codes: `[*B]` (or `[*B, G]` when `groups > 1`) integer codes.
        cfg: the static configuration.

    Returns:
        `[..., F (at cfg.dim), ...]` tensor of rank `len(B) + 1` in the params' dtype.
    """
    _validate.check_params(params, cfg, where="dequantize")
    _validate.check_codes(codes, cfg, where="dequantize")
    if codes.device != params.codebook.device:
        raise ValueError(
            f"dequantize: codes are on {codes.device} but params.codebook is on "
            f"{params.codebook.device}"
        )
    code_rows, layout = codes_to_rows(codes.long(), cfg)
    return from_rows(code_vectors(params, code_rows, cfg), layout)


def code_vectors(
    params: VQParams, code_rows: Tensor, cfg: QuantizerConfig, dtype: torch.dtype | None = None
) -> Tensor:
    """The effective codes `[M, G, d]` of row codes `[M, G]` (part-local indices; `G` the
    groups, or the levels of a residual quantizer).

    Unit length for `dist="cosine"`, as the search sees them. `dtype`, if given, is the one the
    codebook is cast to before the codes are normalised and looked up.
    """
    codebook = effective_codebook(params, cfg)
    if dtype is not None:
        codebook = codebook.to(dtype)
    if isinstance(cfg, VQConfig) and cfg.dist == "cosine":
        codebook = F.normalize(codebook, dim=-1)
    if cfg.share:
        return codebook[code_rows]
    return codebook[torch.arange(cfg.layout.parts, device=codebook.device), code_rows]
