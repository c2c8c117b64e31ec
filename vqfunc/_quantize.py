"""`quantize` and `dequantize`: the functional vector quantizer.

The core is written for one codebook and one group (`_quantize_group`); grouped VQ is
`torch.func.vmap` of it over the group axis, with the codebook shared (`in_dims=None`) or
stacked per group (`in_dims=0`). The straight-through estimator (the default) takes a fused
path instead: the search is vmapped the same way, then the output and the commitment loss are
one chunked node over all groups' rows (`vqfunc._kernels.straight_through`), which keeps the
forward and backward free of `N x F` temporaries.
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
from vqfunc._kernels.straight_through import straight_through_with_loss
from vqfunc._layout import codes_to_batch, codes_to_rows, from_rows, rows_to_batch, to_rows
from vqfunc._losses import commitment_loss
from vqfunc._metrics import perplexity
from vqfunc._params import VQParams
from vqfunc._search import nearest_codes, search_dtype


class QuantizeOutput(NamedTuple):
    """Everything `quantize` computed besides the quantized tensor.

    With `B` the input's shape without its feature axis and `G = cfg.groups`:

    Attributes:
        codes: `[*B]` int64 code indices (`[*B, G]` when `groups > 1`); with separate
            codebooks, indices into the group's own codebook.
        distances: distances to the selected codes, shaped like `codes` (between normalised
            vectors for cosine).
        loss: scalar commitment loss with `cfg.beta` (masked rows excluded).
        z: `[*B, F]` the input vectors as the search saw them (normalised for cosine).
        codewords: `[*B, F]` their selected codes, before the gradient estimator (the
            returned `z_q` carries the estimator); differentiable with respect to the codebook.
        perplexity: scalar code perplexity (mean over codebooks).
        histogram: `[num_books, K]` code counts (masked rows excluded).
    """

    codes: Tensor
    distances: Tensor
    loss: Tensor
    z: Tensor
    codewords: Tensor
    perplexity: Tensor
    histogram: Tensor


def _quantize_group(codebook: Tensor, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One group against one codebook: `([K, d], [M, d]) -> (z_q [M, d], codes, distances)`."""
    codes, distances = nearest_codes(z, codebook)
    return codebook.index_select(0, codes), codes, distances


def _search_space(rows: Tensor, codebook: Tensor, cfg: VQConfig) -> tuple[Tensor, Tensor]:
    if cfg.dist == "cosine":
        return F.normalize(rows, dim=-1), F.normalize(codebook, dim=-1)
    return rows, codebook


def compute_dtype(x: Tensor, params: VQParams) -> torch.dtype:
    """Precision of the quantizer's arithmetic: at least float32, float64 if either is."""
    return search_dtype(torch.promote_types(x.dtype, params.codebook.dtype))


def quantize_rows(
    params: VQParams, rows: Tensor, cfg: VQConfig, row_mask: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The quantizer on rows `[M, G, d]` (in the compute dtype), without input checks.

    Returns `(out_rows, z, z_q, codes [M, G], distances [M, G], loss, histogram)`, where
    `out_rows` carries the gradient estimator.
    """
    codebook = effective_codebook(params, cfg).to(rows.dtype)
    z, codebook = _search_space(rows, codebook, cfg)
    if cfg.estimator == "ste":
        out, z_q, codes, distances, loss = _straight_through_rows(z, codebook, cfg, row_mask)
    else:
        grouped = torch.func.vmap(
            _quantize_group, in_dims=(None if cfg.share else 0, 1), out_dims=1
        )
        z_q, codes, distances = grouped(codebook, z)
        loss_mask = None if row_mask is None else row_mask.unsqueeze(-1).expand(codes.shape)
        loss = commitment_loss(z, z_q, cfg.beta, mask=loss_mask)
        out = estimate(z, z_q, cfg)
    if cfg.vector_normalize:
        out = out * rows.norm(dim=-1, keepdim=True)
    histogram = book_histogram(codes, cfg, row_mask)
    return out, z, z_q, codes, distances, loss, histogram


def _straight_through_rows(
    z: Tensor, codebook: Tensor, cfg: VQConfig, row_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The straight-through path on rows `[M, G, d]`, fused with the commitment loss.

    The `G` groups are pooled into `M * G` rows against one flat codebook (separate codebooks
    `[G, K, d]` become `[G * K, d]`, indexed by `code + g * K`), so that the estimator and the
    loss run as one chunked node (`vqfunc._kernels.straight_through`) instead of several `M x F`
    temporaries.

    Returns `(out, z_q, codes [M, G], distances [M, G], loss)`.
    """
    search = torch.func.vmap(nearest_codes, in_dims=(1, None if cfg.share else 0), out_dims=1)
    codes, distances = search(z, codebook)
    weights = None if row_mask is None else _flat_row_weights(row_mask, codes, z.dtype)
    out, z_q, loss = straight_through_with_loss(
        z.reshape(-1, cfg.code_dim),
        codebook.reshape(-1, cfg.code_dim),
        _flat_codes(codes, cfg),
        beta=cfg.beta,
        nu=cfg.sync_nu,
        weights=weights,
    )
    return out.view(z.shape), z_q.view(z.shape), codes, distances, loss


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
        mask: optional `[*B]` tensor (bool or float) over the input's non-feature axes; rows
            at 0 are quantized but excluded from the loss, histogram and perplexity.

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
    out_rows, z, z_q, codes, distances, loss, histogram = quantize_rows(params, rows, cfg, row_mask)
    output = QuantizeOutput(
        codes=codes_to_batch(codes, layout, cfg),
        distances=codes_to_batch(distances, layout, cfg),
        loss=loss,
        z=rows_to_batch(z, layout),
        codewords=rows_to_batch(z_q, layout),
        perplexity=perplexity(histogram).mean(),
        histogram=histogram,
    )
    return from_rows(out_rows, layout).to(x.dtype), output


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
