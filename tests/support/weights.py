"""Row weights for the quantizer tests: none, 0/1 (as float32) or fractional in [0, 1)."""

from __future__ import annotations

import torch


def row_weights(m: int, kind: str, generator: torch.Generator) -> torch.Tensor | None:
    """`[m]` float32 row weights of `kind` "none" (None), "bool" (0 or 1, about 70 % ones) or
    "float" (uniform in [0, 1)), drawn from `generator`."""
    if kind == "none":
        return None
    if kind == "bool":
        return (torch.rand(m, generator=generator) > 0.3).float()
    if kind == "float":
        return torch.rand(m, generator=generator)
    raise ValueError(f"kind: expected 'none', 'bool' or 'float', got {kind!r}")
