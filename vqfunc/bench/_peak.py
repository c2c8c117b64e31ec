"""The physical floor of the bench: the FMA peak of the ISA path the CPU kernels take.

`fma_peak` runs the FMA probe of the kernel library (independent chains of vector
multiply-adds, enough of them to hide the FMA latency, unrolled and kept in registers) on
`torch.get_num_threads()` OpenMP threads, on the vectors of the path in use (AVX-512, AVX2 or
portable), and keeps the best of a few runs. `2 N K D / peak` is then the time no search of
`N` rows against `K` codes of dimension `D` can beat on these cores.
"""

from __future__ import annotations

from dataclasses import dataclass

from vqfunc._kernels import cpu as _cpu_kernel
from vqfunc._kernels import policy as _policy

# Rounds of one probe run: about 50 ms at 100 GFLOP/s with 24 chains of 16 lanes.
_ROUNDS = 1 << 17


@dataclass(frozen=True)
class Peak:
    """The ISA path and its measured FMA rate in flop/s, on `threads` threads."""

    isa: str
    rate: float
    threads: int

    def __str__(self) -> str:
        return f"{self.isa} path, FMA peak {self.rate / 1e9:.1f} GFLOP/s on {self.threads} threads"


def fma_peak(repeats: int = 5, rounds: int = _ROUNDS) -> Peak | None:
    """The best of `repeats` FMA probe runs on the path in use, on `torch.get_num_threads()`
    threads; None when the compiled CPU kernels are not available."""
    if not _cpu_kernel.available():
        return None
    isa = _policy.cpu_isa()
    threads = _cpu_kernel.max_threads()
    _cpu_kernel.fma_probe(isa, threads, rounds)  # warm-up: the thread pool starts
    rate = max(_cpu_kernel.fma_probe(isa, threads, rounds) for _ in range(max(1, repeats)))
    return Peak(isa, rate, threads)
