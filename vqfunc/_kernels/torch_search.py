"""The pure-torch nearest-code search: the fallback of every device, dtype and machine.

Chunked `addmm` + `argmin`, with chunks sized so that one `chunk x K` score block stays in
cache; it never builds an `N x K` matrix.

What every search backend does alike (so they pick the same codes):

- codes with a non-finite entry are never chosen (they score `+inf`); a NaN row, or a row
  when no code is finite, gets code 0 (rows with an infinite entry get an unspecified code:
  `vqfunc.quantize` sets the codes of every non-finite row itself);
- vectors and codes are centred on the mean of the finite codes (`codebook_center`) before the
  scores `||c||^2 / 2 - z.c` are formed: distances do not change under a translation, and a
  large common offset no longer cancels the scores' leading digits.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Elements of one `chunk x K` score block: 2**18 float32 scores are 1 MiB, which stays in cache.
_BLOCK_ELEMENTS = 1 << 18


def chunk_rows(num_codes: int) -> int:
    """Rows per chunk so that one `chunk x K` block holds about `_BLOCK_ELEMENTS` scores."""
    return max(1, _BLOCK_ELEMENTS // max(num_codes, 1))


def codebook_center(codebook: Tensor) -> Tensor:
    """The mean `[d]` of the finite codes of `codebook` `[K, d]` (zeros when none is finite)."""
    finite = torch.isfinite(codebook).all(-1, keepdim=True)
    total = torch.where(finite, codebook, 0).sum(0)
    return total / finite.sum().clamp(min=1).to(total.dtype)


def centered_codebook(codebook: Tensor, center: Tensor) -> tuple[Tensor, Tensor]:
    """`codebook - center` with non-finite codes zeroed, and the half squared norms `[K]` of
    the centred codes, `+inf` for the non-finite ones (so they never score lowest)."""
    moved = codebook - center
    finite = torch.isfinite(moved).all(-1)
    moved = torch.where(finite.unsqueeze(-1), moved, 0)
    half_sq_norms = torch.where(finite, 0.5 * moved.square().sum(-1), torch.inf)
    return moved, half_sq_norms


def search_codes(vectors: Tensor, codebook: Tensor) -> Tensor:
    """Codes `[N]` of the nearest rows of `codebook` `[K, d]` for `vectors` `[N, d]`.

    Ranks by `||c||^2 / 2 - z.c` of the centred vectors and codes, in the tensors' own dtype,
    on any device.
    """
    vectors, codebook = vectors.detach(), codebook.detach()  # codes carry no gradient
    center = codebook_center(codebook)
    moved_codebook, half_sq_norms = centered_codebook(codebook, center)
    n = vectors.shape[0]
    step = chunk_rows(codebook.shape[0])
    # One score block and one centred chunk reused by every chunk, and each chunk's argmin
    # written in place: no small result between freed blocks, which fragments the CPU heap
    # (peak memory then grows with N instead of staying at one block).
    codes = torch.empty(n, dtype=torch.int64, device=vectors.device)
    block = vectors.new_empty(min(step, n), codebook.shape[0])
    moved = vectors.new_empty(min(step, n), vectors.shape[1])
    for start in range(0, n, step):
        rows = min(step, n - start)
        chunk = torch.sub(vectors[start : start + rows], center, out=moved[:rows])
        scores = torch.addmm(half_sq_norms, chunk, moved_codebook.t(), alpha=-1.0, out=block[:rows])
        # All +inf (no finite code) or all NaN (a NaN row): argmin answers 0, as the C kernel.
        torch.argmin(scores, dim=-1, out=codes[start : start + rows])
    return codes
