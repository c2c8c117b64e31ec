"""The pure-torch nearest-code search: the fallback of every device, dtype and machine.

Chunked `addmm` + `argmin`, with chunks sized so that one `chunk x K` score block stays in
cache; it never builds an `N x K` matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Elements of one `chunk x K` score block: 2**18 float32 scores are 1 MiB, which stays in cache.
_BLOCK_ELEMENTS = 1 << 18


def chunk_rows(num_codes: int) -> int:
    """Rows per chunk so that one `chunk x K` block holds about `_BLOCK_ELEMENTS` scores."""
    return max(1, _BLOCK_ELEMENTS // max(num_codes, 1))


def search_codes(vectors: Tensor, codebook: Tensor) -> Tensor:
    """Codes `[N]` of the nearest rows of `codebook` `[K, d]` for `vectors` `[N, d]`.

    Ranks by `||c||^2 / 2 - z.c` in the tensors' own dtype, on any device.
    """
    vectors, codebook = vectors.detach(), codebook.detach()  # codes carry no gradient
    half_sq_norms = 0.5 * codebook.square().sum(-1)
    n = vectors.shape[0]
    step = chunk_rows(codebook.shape[0])
    # One score block reused by every chunk, and each chunk's argmin written in place: no
    # small result between freed blocks, which fragments the CPU heap (peak memory then grows
    # with N instead of staying at one block).
    codes = torch.empty(n, dtype=torch.int64, device=vectors.device)
    block = vectors.new_empty(min(step, n), codebook.shape[0])
    for start in range(0, n, step):
        rows = min(step, n - start)
        scores = torch.addmm(
            half_sq_norms, vectors[start : start + rows], codebook.t(), alpha=-1.0, out=block[:rows]
        )
        torch.argmin(scores, dim=-1, out=codes[start : start + rows])
    return codes
