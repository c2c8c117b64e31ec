"""Nearest-code search: the one hot path of the library.

`nearest_codes(vectors [N, d], codebook [K, d]) -> (codes [N], distances [N])`, exact
Euclidean nearest codes. Rows are processed in chunks so that no `N x K` matrix is ever
materialised: peak extra memory is one `chunk x K` block.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Elements of one `chunk x K` score block: 2**18 float32 scores are 1 MiB, which stays in cache.
_BLOCK_ELEMENTS = 1 << 18


def search_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision in which distances are ranked: float32 for half inputs, else unchanged."""
    return torch.promote_types(dtype, torch.float32)


def chunk_rows(num_codes: int) -> int:
    """Rows per chunk so that one `chunk x K` block holds about `_BLOCK_ELEMENTS` scores."""
    return max(1, _BLOCK_ELEMENTS // max(num_codes, 1))


@torch.no_grad()
def nearest_codes(vectors: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """Index and Euclidean distance of the nearest code of every vector.

    Ranks by `||c||^2 - 2 z.c` (same argmin as `||z - c||`) in at least float32, then computes
    the exact distance to the chosen code.

    Args:
        vectors: `[N, d]` floating tensor.
        codebook: `[K, d]` floating tensor on the same device.

    Returns:
        codes: `[N]` int64 indices into `codebook`.
        distances: `[N]` Euclidean distances `||z - codebook[codes]||` in the search dtype.
    """
    dtype = search_dtype(torch.promote_types(vectors.dtype, codebook.dtype))
    z = vectors.to(dtype)
    c = codebook.to(dtype)
    half_sq_norms = 0.5 * (c * c).sum(-1)
    step = chunk_rows(c.shape[0])
    parts = []
    # At least one (possibly empty) chunk, so an empty batch flows through the same ops.
    for start in range(0, max(z.shape[0], 1), step):
        block = torch.addmm(half_sq_norms, z[start : start + step], c.t(), alpha=-1.0)
        parts.append(block.argmin(-1))
    codes = torch.cat(parts) if len(parts) > 1 else parts[0]
    distances = (z - c[codes]).norm(dim=-1)
    return codes, distances
