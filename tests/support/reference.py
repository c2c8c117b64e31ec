"""Brute-force references the tests and the workers check against."""

from __future__ import annotations

import torch


def brute_force(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Squared distances `[N, K]` in float64, from differences (not the matrix-product form)."""
    mode = "donot_use_mm_for_euclid_dist"
    return torch.cdist(vectors.double(), codebook.double(), compute_mode=mode).square()


def assert_nearest(vectors: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor) -> None:
    """Each code is a nearest code up to float32 rounding of the ranking."""
    sq = brute_force(vectors, codebook)
    chosen = sq.gather(1, codes.view(-1, 1)).squeeze(1)
    best = sq.min(1).values
    scale = vectors.double().square().sum(-1) + codebook.double().square().sum(-1).max()
    assert torch.all(chosen - best <= 1e-5 * scale + 1e-30)
