"""Per-codebook views of a quantizer's output, shared by the state updates.

A shared codebook sees every group's vectors; separate codebooks each see their own group.
Either way the state updates work on `[num_books, N, ...]` tensors, `N` the vectors each
codebook saw.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from vqfunc._config import QuantizerConfig


class BookVectors(NamedTuple):
    """A batch laid out per codebook.

    Attributes:
        vectors: `[num_books, N, d]` the vectors each codebook saw.
        codes: `[num_books, N]` int64 their codes.
        weights: `[num_books, N]` float row weights (0 for masked rows).
    """

    vectors: Tensor
    codes: Tensor
    weights: Tensor


def rows_per_book(num_rows: int, cfg: QuantizerConfig) -> int:
    """Number `N` of vectors each codebook sees in a batch of `num_rows` input vectors."""
    return num_rows * cfg.layout.parts if cfg.share else num_rows


def book_vectors(
    z: Tensor, codes: Tensor, cfg: QuantizerConfig, mask: Tensor | None = None
) -> BookVectors:
    """`QuantizeOutput.z` `[*B, F]` and `.codes` `[*B(, G)]` (and a mask) per codebook.

    The mask is `[*B]` (one weight per row) or `[*B, G]` (one per row and part, e.g. the
    levels a row's quantizer-dropout depth reached)."""
    rows = z.reshape(-1, cfg.layout.parts, cfg.layout.code_dim)
    row_codes = codes.reshape(-1, cfg.layout.parts).long()
    if mask is None:
        weights = torch.ones(row_codes.shape, device=z.device, dtype=z.dtype)
    else:
        # `[*B, G]` has `z`'s number of axes, `[*B]` one fewer.
        per_part = mask.dim() == z.dim()
        weights = mask.reshape(-1, cfg.layout.parts if per_part else 1).to(z.dtype)
        weights = weights.expand(row_codes.shape)
    if cfg.share:
        return BookVectors(
            rows.reshape(1, -1, cfg.layout.code_dim),
            row_codes.reshape(1, -1),
            weights.reshape(1, -1),
        )
    return BookVectors(rows.transpose(0, 1), row_codes.t(), weights.t())


def as_books(codebook: Tensor, cfg: QuantizerConfig) -> Tensor:
    """A codebook `[K, d]` or `[G, K, d]` as `[num_books, K, d]`."""
    return codebook.reshape(cfg.layout.num_books, cfg.layout.codes_per_book, cfg.layout.code_dim)


def from_books(books: Tensor, cfg: QuantizerConfig) -> Tensor:
    """`[num_books, K, d]` back to `cfg.layout.codebook_shape`."""
    return books.reshape(cfg.layout.codebook_shape)
