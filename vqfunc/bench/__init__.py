"""`python -m vqfunc.bench`: speed and memory of the nearest-code search, side by side.

For each shape `(N, D, K)` it times, in one run and interleaved (so that a busy machine slows
every method alike): vqfunc's `nearest_codes`; vqfunc's `quantize` forward and
forward+backward; a naive `torch.cdist` + `argmin` over the full `N x K` matrix; faiss
`IndexFlatL2` when faiss is installed (`pip install vqfunc[bench]`); and the floor
`2 N K D / GEMM rate`, the rate measured here on a large square matrix product (best run),
and `2 N K D / peak`, the FMA peak of the kernel library's probe (the best probe of the run:
one before the first shape and one after each). On CPU each method is timed after a short
pause, so that no method pays for the threads the method before it left spinning, and after
one untimed call of its own, so that none pays for the cold start the pause itself causes
(cores woken, data evicted), which a call in a training loop does not meet; every timed call
runs with Python's garbage collector paused (as `timeit` does), so that no method pays for a
collection that another one's objects caused. Each is printed as its best (`--statistic
median`: its median) time and as a ratio; the codes of every method are compared with
vqfunc's. By default glibc's `malloc` is told to keep freed memory for reuse, for every method
alike (`--allocator system` keeps its defaults, under which each call returning large tensors
pays the OS for fresh zeroed pages; see `vqfunc.bench._allocator`); the first line says which.

Peak memory: on CPU, torch allocates through the C allocator, which `tracemalloc` does not see,
so peaks are read from the kernel: `/proc/self/clear_refs` resets the peak resident set size
(`VmHWM` in `/proc/self/status`), the call runs, and the new peak minus the resident size
before the call is the call's peak extra memory (freed heap is first returned with
`malloc_trim`, so it does not hide in the baseline). On CUDA, `torch.cuda` memory statistics.

Options: `--device cuda`, `--dtype`, `--threads`, `--repeats`, `--quick` (tiny shapes, used by
the test suite, which checks the codes, never the timings), `--memory` (peak extra memory
of `quantize` on N = 1,000,000, D = 64, K = 8192) and `--lfq BITS` (time and peak extra memory
of the loss of `vqfunc.lfq.quantize` at `BITS` bits on `--rows` vectors, forward and
forward+backward, next to the size of the `N x 2**BITS` table a full computation would hold),
`--kmeans` (`warmup_params(method="kmeans")` against faiss and scikit-learn k-means, time
and error; see `vqfunc.bench._kmeans`), `--paths A,B,...` (the CPU search on those ISA paths of
the kernels side by side, e.g. `--paths avx512,amx`; see `vqfunc.bench._paths`) and
`--gpu-check` (the CUDA tests, then the torch and
Triton paths compared on CUDA; see `vqfunc.bench._gpu_check`).
"""

from __future__ import annotations

from vqfunc.bench._cli import main
from vqfunc.bench._kmeans import (
    KMEANS_QUICK_SHAPES,
    KMEANS_SHAPES,
    KMeansRow,
    format_kmeans_table,
    kmeans_error,
    kmeans_row,
)
from vqfunc.bench._lfq import lfq_check
from vqfunc.bench._search import (
    FULL_SHAPES,
    MEMORY_SHAPE,
    QUICK_SHAPES,
    Row,
    bench_shape,
    format_table,
    memory_check,
)
from vqfunc.bench._timing import PeakMemory, gemm_rate

__all__ = [
    "FULL_SHAPES",
    "KMEANS_QUICK_SHAPES",
    "KMEANS_SHAPES",
    "MEMORY_SHAPE",
    "QUICK_SHAPES",
    "KMeansRow",
    "PeakMemory",
    "Row",
    "bench_shape",
    "format_kmeans_table",
    "format_table",
    "gemm_rate",
    "kmeans_error",
    "kmeans_row",
    "lfq_check",
    "main",
    "memory_check",
]
