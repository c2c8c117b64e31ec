"""Which input rows are valid: finite, and for cosine with no (near) zero-norm group (see the
policy in the docstring of `vqfunc._quantize`)."""

from __future__ import annotations

import torch
from torch import Tensor

# Below this norm a vector (or code) has no direction: `F.normalize` stops normalising there.
MIN_NORM = 1e-12


def valid_rows(rows: Tensor, cosine: bool) -> Tensor:
    """`[M]` bool: rows `[M, G, d]` whose entries are all finite (and, for cosine, whose every
    group has a norm above `MIN_NORM`)."""
    if rows.shape[-1] > 0:
        # One pass over the rows: their extremes are finite exactly when every entry is (a
        # NaN propagates to both), and only the small [M, G] extremes are tested.
        low, high = torch.aminmax(rows, dim=-1)
        valid = (torch.isfinite(low) & torch.isfinite(high)).flatten(1).all(-1)
    else:
        valid = torch.isfinite(rows).flatten(1).all(-1)
    if cosine:
        valid = valid & (rows.norm(dim=-1) > MIN_NORM).all(-1)
    return valid
