"""Levels of a residual quantizer: how many run, which rows each one reaches, their codebooks.

A residual quantizer may run fewer levels than it has (`n_levels`, for a lower bitrate), and
in training its output may sum fewer levels for some rows (quantizer dropout, a `depth` per
row). Both keep shapes static: `n_levels` is a Python int (the codes have `n_levels` entries),
`depth` a tensor that masks the levels of each row (levels `>= depth` are searched, but left
out of the output, the loss and the histogram).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vqfunc import _validate
from vqfunc.residual._config import ResidualConfig


def level_book(codebook: Tensor, level: int, cfg: ResidualConfig) -> Tensor:
    """The `[K_i, F]` codes level `level` searches (per-level sizes: the unpadded rows)."""
    if cfg.share:
        return codebook
    return codebook[level, : cfg.level_sizes[level]]


def check_depth(depth: object, batch_shape: tuple[int, ...], n: int, *, where: str) -> Tensor:
    """`depth` as an int64 `[*B]` tensor of values in `[1, n]` (broadcast to `batch_shape`)."""
    if not isinstance(depth, Tensor):
        raise TypeError(f"{where}: depth must be a tensor or None, got {type(depth).__name__}")
    if depth.dtype.is_floating_point or depth.dtype.is_complex or depth.dtype == torch.bool:
        raise TypeError(f"{where}: depth must be an integer tensor, got {depth.dtype}")
    try:
        depth = torch.broadcast_to(depth, batch_shape)
    except RuntimeError:
        raise ValueError(
            f"{where}: depth has shape {tuple(depth.shape)}, which does not broadcast to "
            f"{batch_shape} (the input's shape without its feature axis)"
        ) from None
    if _validate._holds((depth < 1) | (depth > n)):
        bad = depth[(depth < 1) | (depth > n)].flatten()[0].item()
        raise ValueError(
            f"{where}: depth holds {bad}; expected depths in [1, {n}] (levels that run)"
        )
    return depth.long()


def check_level_codes(
    codes: object, cfg: ResidualConfig, n_levels: int | None, *, where: str
) -> tuple[Tensor, int]:
    """`codes` `[*B, L]` or `[*B, n_levels]` integer codes in range, as `(codes[..., :n], n)`."""
    if not isinstance(codes, Tensor):
        raise TypeError(f"{where}: codes must be a tensor, got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"{where}: codes must be an integer tensor, got {codes.dtype}")
    n = cfg.check_n_levels(n_levels, where=where)
    if codes.ndim == 0 or codes.shape[-1] not in (n, cfg.levels):
        sizes = f"levels={cfg.levels}"
        if n < cfg.levels:
            sizes = f"n_levels={n} or {sizes}"
        raise ValueError(
            f"{where}: codes must have a trailing axis of size {sizes} (one code per level), "
            f"got shape {tuple(codes.shape)}"
        )
    codes = codes[..., :n]
    for level, k in enumerate(cfg.level_sizes[:n]):
        _validate.check_code_range(codes[..., level], k, where=f"{where} (level {level})")
    return codes, n


def level_histogram(codes: Tensor, weights: Tensor, cfg: ResidualConfig) -> Tensor:
    """Counts `[num_books, K]` of row codes `[M, n]`, weighted per row and level `[M, n]`
    (float32)."""
    k = cfg.codes_per_book
    flat = codes
    if not cfg.share:
        flat = codes + torch.arange(codes.shape[-1], device=codes.device) * k
    values = weights.reshape(-1).to(torch.float32)
    counts = values.new_zeros(cfg.num_books * k).scatter_add(0, flat.reshape(-1), values)
    return counts.view(cfg.num_books, k)


def padding_slots(cfg: ResidualConfig, device: torch.device) -> Tensor:
    """`[num_books, K]` bool: the storage rows beyond each level's size (per-level sizes)."""
    k = cfg.codes_per_book
    sizes = torch.tensor(cfg.level_sizes if not cfg.share else (k,), device=device)
    return torch.arange(k, device=device) >= sizes.unsqueeze(-1)
