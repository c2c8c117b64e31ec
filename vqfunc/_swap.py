"""Swapping chosen codes for new effective vectors, the last step of every replacement rule."""

from __future__ import annotations

import torch
from torch import Tensor

from vqfunc._affine import effective_codebook, invert_affine
from vqfunc._books import as_books, from_books
from vqfunc._config import QuantizerConfig
from vqfunc._params import VQParams


def swap_codes(
    params: VQParams, replaced: Tensor, vectors: Tensor, cfg: QuantizerConfig
) -> VQParams:
    """`params` whose codes at `replaced` (`[num_books, K]` bool) have the effective values
    `vectors` (`[num_books, K, d]`, in the space the search sees).

    A replaced raw code is `invert_affine` of its vector; the other codes keep their raw values
    bit for bit (the affine round trip may round). The affine parameters are unchanged.
    """
    effective = as_books(effective_codebook(params, cfg), cfg)
    new_effective = torch.where(replaced.unsqueeze(-1), vectors.to(effective.dtype), effective)
    raw = as_books(invert_affine(from_books(new_effective, cfg), params, cfg), cfg)
    old = as_books(params.codebook, cfg)
    codebook = torch.where(replaced.unsqueeze(-1), raw.to(old.dtype), old)
    return params._replace(codebook=from_books(codebook, cfg))
