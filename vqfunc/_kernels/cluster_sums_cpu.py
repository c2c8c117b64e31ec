"""The compiled centroid update of k-means (`csrc/cluster_sums.c`): a ctypes wrapper.

`cluster_sums(x, codes, k)` gives, for float32 CPU rows `x` `[n, d]` and int64 codes `[n]`, the
per-code sums of the rows `[k, d]` and their numbers `[k]` in one pass, each thread owning a
range of codes and adding its rows in row order: bit-identical to `index_add_` and `bincount`,
whatever the thread count. `vqfunc._kmeans` calls it when `applies` says so, and torch
otherwise.

The checks here guard the memory the C code reads and writes: shapes, dtypes and devices are
verified before any pointer reaches C, and codes are range-checked in C.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vqfunc._kernels import cpu as _cpu_kernel
from vqfunc._kernels import policy as _policy

# Below this many row elements per thread a second thread costs more than it saves.
_MIN_ELEMENTS_PER_THREAD = 1 << 18


def applies(x: Tensor, codes: Tensor) -> bool:
    """Whether float32 rows `x` and int64 `codes` can go to the C kernel: plain CPU tensors
    (no subclass or functorch wrapper), and the backend policy chooses the compiled kernels."""
    plain = all(
        type(t) is Tensor
        and t.device.type == "cpu"
        and not t.is_neg()
        and not torch._C._functorch.is_functorch_wrapped_tensor(t)
        for t in (x, codes)
    )
    return (
        plain
        and x.dtype == torch.float32
        and codes.dtype == torch.int64
        and _policy.cpu_kernel_runs(x)
    )


def cluster_sums(
    x: Tensor, codes: Tensor, k: int, *, threads: int | None = None
) -> tuple[Tensor, Tensor]:
    """Per-code sums `[k, d]` float32 of the rows of `x` `[n, d]` and counts `[k]` int64.

    `codes` `[n]` int64 in `[0, k)`; requires `applies(x, codes)`. `threads`: how many threads
    (None: as many as the work pays for, up to `cpu.max_threads()`); the result does not
    depend on it. Raises for a code outside `[0, k)` or mismatched shapes.
    """
    lib = _cpu_kernel.library()
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D tensor [n, d], got shape {tuple(x.shape)}")
    n, d = x.shape
    if codes.shape != (n,):
        raise ValueError(
            f"codes: expected shape ({n},) (one per row of x), got {tuple(codes.shape)}"
        )
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected an int >= 1, got {k!r}")
    rows = x.contiguous()
    index = codes.contiguous()
    sums = torch.empty(k, d, dtype=torch.float32)
    counts = torch.empty(k, dtype=torch.int64)
    if threads is None:
        threads = min(_cpu_kernel.max_threads(), (n * d) // _MIN_ELEMENTS_PER_THREAD)
    threads = max(1, min(threads, k))
    status = lib.vq_cluster_sums_f32(
        rows.data_ptr(), n, d, index.data_ptr(), k, sums.data_ptr(), counts.data_ptr(), threads
    )
    _cpu_kernel.check_status(status)
    return sums, counts
