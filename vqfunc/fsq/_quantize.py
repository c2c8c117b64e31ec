"""Finite scalar quantization: `quantize`, `dequantize`, the implicit codebook.

Each feature `z_j` of a vector is bounded and rounded to one of `L_j = levels[j]` values
(Mentzer et al., 2023, appendix A.1):

- the paper's grid: `b_j = tanh(z_j + shift_j) * h_j - offset_j` with
  `h_j = (L_j - 1)(1 - eps) / 2`, `eps = 1e-3`, `offset_j = 1/2` for even `L_j` (else 0)
  and `shift_j = tan(offset_j / h_j)` (the reference code's `tan`; `arctanh` would centre
  exactly, agrees to `O(x^5)` for `L_j >= 4`, and is undefined for `L_j = 2`); the level
  index is `k_j = round(b_j) + L_j // 2` and the value `(k_j - L_j // 2) / (L_j // 2)`;
- the symmetric grid (`preserve_symmetry`, Parker et al., 2024): `t_j = tanh(z_j)`,
  `k_j = floor((L_j - 1)(t_j + 1) / 2 + 1/2)` and the value `2 k_j / (L_j - 1) - 1`.

The code of a vector is `sum_j k_j * prod(L_0 .. L_{j-1})` (the first feature least
significant). The bound runs in float32 (float64 for float64 inputs) whatever the input's
dtype, level indices and codes are integers, and values are formed from the integer indices by
one division, so `dequantize` gives exactly the forward value of `quantize` and half-precision
inputs reach every code. The gradient is the paper's straight-through estimate: that of the
bounded value `b_j / (L_j // 2)` (`t_j` on the symmetric grid) before rounding.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from vqfunc import _validate
from vqfunc._layout import Layout, from_rows, normalize_dim, rows_to_batch, to_rows
from vqfunc._metrics import perplexity, usage
from vqfunc._search import search_dtype
from vqfunc.fsq._config import FSQConfig, ResidualFSQConfig, _GridConfig

# The paper's margin that keeps the bounded values strictly inside the outermost levels.
EPS = 1e-3


class FSQOutput(NamedTuple):
    """Everything `vqfunc.fsq.quantize` computed besides the quantized tensor.

    With `B` the input's shape without its feature axis and `C = cfg.num_codebooks`:

    Attributes:
        codes: `[*B]` int64 codes in `[0, cfg.codebook_size)` (`[*B, C]` when `C > 1`).
        bounded: `[*B, F]` the bounded values before rounding, in the output's units (the
            returned `z_q` takes their gradient), in the compute dtype.
        perplexity: scalar code perplexity.
        usage: scalar fraction of the codes used at least once.
        histogram: `[1, cfg.codebook_size]` code counts over all sub-vectors (masked rows
            excluded).
    """

    codes: Tensor
    bounded: Tensor
    perplexity: Tensor
    usage: Tensor
    histogram: Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The bound's precision: float32, or float64 for float64 inputs."""
    return search_dtype(dtype)


def _constants(cfg: _GridConfig, like: Tensor) -> dict[str, Tensor]:
    """Per-feature constants `[d]` of the grid, on `like`'s device and in its dtype."""
    levels = cfg.levels
    half_width = [level // 2 for level in levels]
    half_l = [(level - 1) * (1 - EPS) / 2 for level in levels]
    offset = [0.5 if level % 2 == 0 else 0.0 for level in levels]
    shift = [math.tan(o / h) for o, h in zip(offset, half_l, strict=True)]
    values = {
        "levels": [float(level) for level in levels],
        "half_width": [float(h) for h in half_width],
        "half_l": half_l,
        "offset": offset,
        "shift": shift,
    }
    return {
        name: torch.tensor(v, dtype=like.dtype, device=like.device) for name, v in values.items()
    }


def bound(z: Tensor, cfg: _GridConfig) -> tuple[Tensor, Tensor]:
    """`z [..., d]` (compute dtype) -> `(bounded [..., d], level indices [..., d] int64)`.

    `bounded` is the continuous value in the output's units whose rounding the level index is.
    """
    c = _constants(cfg, z)
    if cfg.preserve_symmetry:
        bounded = torch.tanh(z)
        scaled = (c["levels"] - 1) * (bounded + 1) / 2 + 0.5
        index = torch.floor(scaled)
    else:
        centred = torch.tanh(z + c["shift"]) * c["half_l"] - c["offset"]
        bounded = centred / c["half_width"]
        index = torch.round(centred) + c["half_width"]
    return bounded, _to_levels(index, c)


def level_values(index: Tensor, cfg: _GridConfig, dtype: torch.dtype) -> Tensor:
    """The grid values `[..., d]` of level indices `[..., d]`, each from one division of
    integers (so the same indices give the same values, bit for bit, in every caller)."""
    if cfg.preserve_symmetry:
        span = torch.tensor([level - 1 for level in cfg.levels], device=index.device)
        return (2 * index - span).to(dtype) / span.to(dtype)
    half_width = torch.tensor([level // 2 for level in cfg.levels], device=index.device)
    return (index - half_width).to(dtype) / half_width.to(dtype)


def grid_round(y: Tensor, cfg: _GridConfig) -> Tensor:
    """Level indices `[..., d]` of the grid values nearest to `y` (in the output's units),
    clamped to the grid: the rounding without the bound."""
    c = _constants(cfg, y)
    if cfg.preserve_symmetry:
        index = torch.floor((c["levels"] - 1) * (y + 1) / 2 + 0.5)
    else:
        index = torch.round(y * c["half_width"]) + c["half_width"]
    return _to_levels(index, c)


def _to_levels(index: Tensor, c: dict[str, Tensor]) -> Tensor:
    """Integer-valued float indices -> int64 level indices in `[0, L - 1]`; a NaN input (which
    the bound cannot place) takes level 0, so that its code stays in range."""
    index = torch.nan_to_num(index, nan=0.0)
    return torch.minimum(torch.clamp(index, min=0), c["levels"] - 1).long()


def indices_to_codes(index: Tensor, cfg: _GridConfig) -> Tensor:
    """Level indices `[..., d]` -> codes `[...]`, the first feature least significant."""
    return (index * _basis(cfg, index.device)).sum(-1)


def codes_to_indices(codes: Tensor, cfg: _GridConfig) -> Tensor:
    """Codes `[...]` -> level indices `[..., d]` (the inverse of `indices_to_codes`)."""
    basis = _basis(cfg, codes.device)
    levels = torch.tensor(cfg.levels, dtype=torch.int64, device=codes.device)
    return torch.div(codes.long().unsqueeze(-1), basis, rounding_mode="floor") % levels


def _basis(cfg: _GridConfig, device: torch.device) -> Tensor:
    basis = [math.prod(cfg.levels[:j]) for j in range(len(cfg.levels))]
    return torch.tensor(basis, dtype=torch.int64, device=device)


def straight_through(values: Tensor, bounded: Tensor) -> Tensor:
    """Value exactly `values`, gradient that of `bounded` (`x - x` is exactly 0)."""
    return values + (bounded - bounded.detach())


def check_config(cfg: object, expected: type[_GridConfig], *, where: str) -> None:
    """`cfg` is an `expected` configuration, with a hint for the other FSQ form."""
    if type(cfg) is expected:
        return
    hint = ""
    if isinstance(cfg, ResidualFSQConfig):
        hint = " (for a ResidualFSQConfig use vqfunc.fsq.quantize_residual)"
    elif isinstance(cfg, FSQConfig):
        hint = " (for an FSQConfig use vqfunc.fsq.quantize)"
    raise TypeError(
        f"{where}: cfg must be a vqfunc.fsq.{expected.__name__} (e.g. "
        f"{expected.__name__}(levels=(8, 5, 5, 5), dim=-1)), got {type(cfg).__name__}{hint}"
    )


def quantize(x: Tensor, cfg: FSQConfig, *, mask: Tensor | None = None) -> tuple[Tensor, FSQOutput]:
    """Quantize every feature of `x` to its grid.

    Pure, and without parameters: composes with `torch.func.grad`, `torch.func.vmap` and
    `torch.compile(fullgraph=True)`.

    Args:
        x: `[..., F (at cfg.dim), ...]` floating tensor of any rank >= 1, with
            `F = cfg.feature_size`; may be empty.
        cfg: the static configuration.
        mask: optional `[*B]` tensor (bool or float) over the input's non-feature axes; rows
            at 0 are quantized but excluded from the histogram, perplexity and usage.

    Returns:
        z_q: shaped and typed like `x`: the grid values in the forward pass (the float32 or
            float64 values cast to `x`'s dtype), with the gradient of the bounded values.
        out: an `FSQOutput`.
    """
    where = "vqfunc.fsq.quantize"
    check_config(cfg, FSQConfig, where=where)
    _validate.check_input(x, cfg, where=where)
    rows, layout = to_rows(x.to(compute_dtype(x.dtype)), cfg.dim, cfg.num_codebooks)
    row_mask = _row_mask(mask, layout, x, where=where)
    bounded, index = bound(rows, cfg)
    values = level_values(index, cfg, rows.dtype)
    codes = indices_to_codes(index, cfg)  # [M, C]
    histogram = grid_histogram(codes, cfg.codebook_size, row_mask, per_part=False)
    batch = layout.batch_shape
    output = FSQOutput(
        codes=codes.reshape(batch) if cfg.num_codebooks == 1 else codes.reshape(*batch, -1),
        bounded=rows_to_batch(bounded, layout),
        perplexity=perplexity(histogram).mean(),
        usage=usage(histogram).mean(),
        histogram=histogram,
    )
    return from_rows(straight_through(values, bounded), layout).to(x.dtype), output


def dequantize(codes: Tensor, cfg: FSQConfig, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """The grid vectors of `codes`, in the input layout: the inverse of `quantize`'s codes.

    `dequantize(out.codes, cfg, dtype=x.dtype)` equals the forward value of `quantize`'s
    `z_q`, bit for bit (for half inputs, the float32 values cast to `x.dtype`).

    Args:
        codes: `[*B]` integer codes (`[*B, C]` when `cfg.num_codebooks = C > 1`).
        cfg: the static configuration.
        dtype: floating dtype of the result.

    Returns:
        `[..., F (at cfg.dim), ...]` tensor of rank `len(B) + 1`.
    """
    where = "vqfunc.fsq.dequantize"
    check_config(cfg, FSQConfig, where=where)
    _check_codes(codes, cfg.num_codebooks, "num_codebooks", where=where)
    _check_dtype(dtype, where=where)
    batch = tuple(codes.shape) if cfg.num_codebooks == 1 else tuple(codes.shape[:-1])
    dim = normalize_dim(cfg.dim, len(batch) + 1, where=where, name="cfg.dim")
    rows = codes.reshape(-1, cfg.num_codebooks)
    values = level_values(codes_to_indices(rows, cfg), cfg, compute_dtype(dtype))
    return from_rows(values, Layout(batch, dim)).to(dtype)


def implicit_codebook(
    cfg: FSQConfig | ResidualFSQConfig,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """The `[prod(levels), len(levels)]` table of every code's grid values (row `k` is code `k`).

    For a residual quantizer, the grid of its first stage (stage `i` scales it by `s_i`).
    """
    if not isinstance(cfg, _GridConfig):
        check_config(cfg, FSQConfig, where="vqfunc.fsq.implicit_codebook")
    _check_dtype(dtype, where="vqfunc.fsq.implicit_codebook")
    codes = torch.arange(cfg.codebook_size, device=device)
    return level_values(codes_to_indices(codes, cfg), cfg, compute_dtype(dtype)).to(dtype)


def codes_from_values(values: Tensor, cfg: FSQConfig) -> Tensor:
    """The codes of grid vectors in the input layout (the inverse of `dequantize`).

    Each feature is rounded to its nearest grid value first, so values that went through a
    lower precision (e.g. `z_q` in bfloat16) find their codes too.

    Args:
        values: `[..., F (at cfg.dim), ...]` floating tensor of grid values.
        cfg: the static configuration.

    Returns:
        `[*B]` int64 codes (`[*B, C]` when `cfg.num_codebooks = C > 1`).
    """
    where = "vqfunc.fsq.codes_from_values"
    check_config(cfg, FSQConfig, where=where)
    _validate.check_input(values, cfg, where=where, name="values")
    rows, layout = to_rows(values.to(compute_dtype(values.dtype)), cfg.dim, cfg.num_codebooks)
    codes = indices_to_codes(grid_round(rows, cfg), cfg)
    batch = layout.batch_shape
    return codes.reshape(batch) if cfg.num_codebooks == 1 else codes.reshape(*batch, -1)


def _row_mask(mask: Tensor | None, layout: Layout, x: Tensor, *, where: str) -> Tensor | None:
    if mask is None:
        return None
    _validate.check_mask(mask, layout.batch_shape, x, where=where)
    return mask.reshape(-1)


def grid_histogram(codes: Tensor, size: int, row_mask: Tensor | None, *, per_part: bool) -> Tensor:
    """Float32 counts of row codes `[M, P]` (rows weighted by `row_mask` `[M]`): `[1, size]`
    pooled over the parts (sub-vectors on one grid), or `[P, size]`, one row per part (the
    stages of a residual quantizer, whose codes stand for differently scaled vectors)."""
    weights = torch.ones(codes.shape, device=codes.device)
    if row_mask is not None:
        weights = weights * row_mask.to(torch.float32).unsqueeze(-1)
    if not per_part:
        flat = weights.new_zeros(size).scatter_add(0, codes.reshape(-1), weights.reshape(-1))
        return flat[None]
    parts = codes.shape[-1]
    offsets = torch.arange(parts, device=codes.device) * size
    flat = weights.new_zeros(parts * size).scatter_add(
        0, (codes + offsets).reshape(-1), weights.reshape(-1)
    )
    return flat.view(parts, size)


def _check_codes(codes: object, parts: int, name: str, *, where: str) -> None:
    if not isinstance(codes, Tensor):
        raise TypeError(f"{where}: codes must be a tensor, got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"{where}: codes must be an integer tensor, got {codes.dtype}")
    if parts > 1 and (codes.ndim == 0 or codes.shape[-1] != parts):
        raise ValueError(
            f"{where}: with {name}={parts}, codes must have a trailing axis of size {parts}, "
            f"got shape {tuple(codes.shape)}"
        )


def _check_dtype(dtype: object, *, where: str) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"{where}: dtype must be a floating torch.dtype (e.g. torch.float32), got {dtype!r}"
        )
