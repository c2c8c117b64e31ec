"""The compiled pass after the search (`csrc/fused_forward.c`): a ctypes wrapper.

`forward` takes float32 CPU rows `[M, G, d]`, their codebook and the search's codes and
distances, and in one pass over the rows computes what `quantize` needs besides the search: the
row validity, `z`, the straight-through output and `z_q`, the commitment loss, the histogram and
the count of invalid rows (see the C source for the formulas).

The checks here guard the memory the C code reads and writes: shapes, dtypes and devices are
verified before any pointer reaches C, and codes are range-checked in C.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from vqfunc._kernels import cpu as _cpu_kernel
from vqfunc._kernels import policy as _policy
from vqfunc._kernels import straight_through_cpu as _straight_through_cpu

# Below this many elements per thread a second thread costs more than it saves.
_MIN_ELEMENTS_PER_THREAD = 1 << 16
# From this many bytes of outputs (z, out, z_q) on, they are written with non-temporal stores
# (where the sizes allow): outputs that large leave the caches anyway, and such stores skip
# reading the lines they overwrite. Smaller outputs stay in cache for whatever reads them next.
_STREAM_BYTES = 12 << 20


class FusedRows(NamedTuple):
    """The pass's results on rows `[M, G, d]` (`B` books of `K` codes)."""

    z: Tensor  # [M, G, d] the rows, zeros where invalid
    out: Tensor  # [M, G, d] the selected codes (the straight-through output's value)
    z_q: Tensor  # [M, G, d] the selected codes
    codes: Tensor  # [M, G] int64, 0 where invalid
    distances: Tensor  # [M, G] float32, NaN where invalid
    loss: Tensor  # [] float32 weighted mean squared difference over the valid rows
    histogram: Tensor  # [B, K] float32 weighted code counts of the valid rows
    valid: Tensor  # [M] bool
    num_invalid: Tensor  # [] int64


def applies(*tensors: Tensor | None) -> bool:
    """Whether these float32 tensors (rows, codebook, mask) can go to the C kernel: plain CPU
    tensors (their memory holds their values), and the backend policy chooses the kernels."""
    return all(_straight_through_cpu.plain(t) for t in tensors) and _policy.cpu_kernel_runs(
        *tensors
    )


def _check(name: str, t: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if tuple(t.shape) != shape or t.dtype != dtype or t.device.type != "cpu":
        raise ValueError(
            f"{name}: expected a {dtype} CPU tensor of shape {shape}, got {t.dtype} "
            f"{tuple(t.shape)} on {t.device}"
        )


@torch.profiler.record_function("vqfunc.cpu_kernel.fused_forward")
def forward(
    rows: Tensor, codebook: Tensor, codes: Tensor, distances: Tensor, mask: Tensor | None
) -> FusedRows:
    """The pass on `rows [M, G, d]`, `codebook [K, d]` (shared) or `[G, K, d]` (one per group),
    the search's `codes [M, G]` (int64, group-local) and `distances [M, G]` (float32), and the
    optional row weights `mask [M]` (float32). `codes` and `distances` are fixed in place (their
    invalid rows set to 0 and NaN) and returned."""
    if rows.dim() != 3:
        raise ValueError(f"rows: expected shape (M, G, d), got {tuple(rows.shape)}")
    m, groups, d = rows.shape
    books = 1 if codebook.dim() == 2 else groups
    k = codebook.shape[-2]
    _check("rows", rows, (m, groups, d), torch.float32)
    _check("codebook", codebook, (k, d) if codebook.dim() == 2 else (groups, k, d), torch.float32)
    _check("codes", codes, (m, groups), torch.int64)
    _check("distances", distances, (m, groups), torch.float32)
    if mask is not None:
        _check("mask", mask, (m,), torch.float32)
    if k < 1 or d < 1:
        raise ValueError(
            f"codebook: expected at least one code of d >= 1, got {tuple(codebook.shape)}"
        )
    if not (codes.is_contiguous() and distances.is_contiguous()):
        raise ValueError(
            "codes, distances: expected contiguous tensors (they are written in place)"
        )
    lib = _cpu_kernel.library()
    rows, codebook = rows.resolve_neg().contiguous(), codebook.resolve_neg().contiguous()
    mask = None if mask is None else mask.resolve_neg().contiguous()
    z, out, z_q = torch.empty_like(rows), torch.empty_like(rows), torch.empty_like(rows)
    valid = torch.empty(m, dtype=torch.bool)
    histogram = torch.empty(books, k, dtype=torch.float32)
    loss = torch.empty((), dtype=torch.float32)
    num_invalid = torch.empty((), dtype=torch.int64)
    threads = max(1, min(_cpu_kernel.max_threads(), rows.numel() // _MIN_ELEMENTS_PER_THREAD))
    status = lib.vq_fused_forward_f32(
        *(rows.data_ptr(), m, groups, d, codebook.data_ptr(), books, k),
        None if mask is None else mask.data_ptr(),
        *(codes.data_ptr(), distances.data_ptr(), z.data_ptr(), out.data_ptr(), z_q.data_ptr()),
        *(valid.data_ptr(), histogram.data_ptr(), loss.data_ptr(), num_invalid.data_ptr()),
        3 * rows.numel() * rows.element_size() >= _STREAM_BYTES,
        threads,
        _cpu_kernel.isa_number(_policy.cpu_isa()),
    )
    _cpu_kernel.check_status(status)
    return FusedRows(z, out, z_q, codes, distances, loss, histogram, valid, num_invalid)


def one_pass_applies(rows: Tensor, codebook: Tensor) -> bool:
    """Whether `search_and_forward` takes rows and a codebook that `applies` accepted: one
    group (rows `[M, 1, d]`, M, d >= 1) against one codebook `[K, d]` (K >= 1)."""
    return (
        rows.dim() == 3
        and rows.shape[0] > 0
        and rows.shape[1] == 1
        and rows.shape[2] > 0
        and codebook.dim() == 2
        and codebook.shape[0] > 0
    )


@torch.profiler.record_function("vqfunc.cpu_kernel.fused_forward")
def search_and_forward(
    rows: Tensor, codebook: Tensor, mask: Tensor | None
) -> tuple[FusedRows, Tensor]:
    """The search and the pass in one (`vq_quantize_f32`): each block of rows is written out
    (validity, `z`, `out`, `z_q`, sums, counts) right after its codes are found, while it is
    still in cache, instead of by a second pass over all rows. Rows `[M, 1, d]` against
    `codebook` `[K, d]` (see `one_pass_applies`), optional row weights `mask [M]`; returns the
    `FusedRows` (codes and distances `[M, 1]`, histogram `[1, K]`) and the perplexity `[]` of
    the histogram. The search runs on the raw rows: a non-finite row gets code 0, distance NaN.
    """
    if rows.dim() != 3 or codebook.dim() != 2:
        raise ValueError(
            f"rows, codebook: expected shapes (M, 1, d) and (K, d), got {tuple(rows.shape)} "
            f"and {tuple(codebook.shape)}"
        )
    m, d, k = rows.shape[0], rows.shape[2], codebook.shape[0]
    _check("rows", rows, (m, 1, d), torch.float32)
    _check("codebook", codebook, (k, d), torch.float32)
    if mask is not None:
        _check("mask", mask, (m,), torch.float32)
    if m < 1 or k < 1 or d < 1:
        raise ValueError(
            f"rows, codebook: expected at least one row and one code of d >= 1, got "
            f"{tuple(rows.shape)} and {tuple(codebook.shape)}"
        )
    lib = _cpu_kernel.library()
    x = rows.resolve_neg().contiguous()
    book = codebook.resolve_neg().contiguous()
    mask = None if mask is None else mask.resolve_neg().contiguous()
    plan = _cpu_kernel.search_plan(m, book)
    z, out, z_q = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
    codes = torch.empty(m, 1, dtype=torch.int64)
    distances = torch.empty(m, 1, dtype=torch.float32)
    valid = torch.empty(m, dtype=torch.bool)
    histogram = torch.empty(1, k, dtype=torch.float32)
    loss = torch.empty((), dtype=torch.float32)
    num_invalid = torch.empty((), dtype=torch.int64)
    perplexity = torch.empty((), dtype=torch.float32)
    status = lib.vq_quantize_f32(
        *(x.data_ptr(), m, d, plan.panels.data_ptr(), plan.half_norms.data_ptr()),
        *(plan.num_panels, k, book.data_ptr(), plan.center.data_ptr()),
        None if mask is None else mask.data_ptr(),
        *(codes.data_ptr(), distances.data_ptr(), z.data_ptr(), out.data_ptr(), z_q.data_ptr()),
        *(valid.data_ptr(), histogram.data_ptr(), loss.data_ptr(), num_invalid.data_ptr()),
        perplexity.data_ptr(),
        3 * x.numel() * x.element_size() >= _STREAM_BYTES,
        *(plan.rows_per_slice, plan.threads, _cpu_kernel.isa_number(_policy.cpu_isa())),
    )
    _cpu_kernel.check_status(status)
    fused = FusedRows(z, out, z_q, codes, distances, loss, histogram, valid, num_invalid)
    return fused, perplexity
