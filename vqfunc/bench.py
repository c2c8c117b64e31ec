"""`python -m vqfunc.bench`: speed and memory of the nearest-code search, side by side.

For each shape `(N, D, K)` it times, in one run and interleaved (so that a busy machine slows
every method alike): vqfunc's `nearest_codes`; vqfunc's `quantize` forward and
forward+backward; a naive `torch.cdist` + `argmin` over the full `N x K` matrix; faiss
`IndexFlatL2` when faiss is installed (`pip install vqfunc[bench]`); and the floor
`2 N K D / GEMM rate`, the rate measured here on a large square matrix product (best run).
On CPU each timed call starts after a short pause, so that no method pays for the threads the
method before it left spinning.
Each is printed as a median time and as a ratio; the codes of every method are compared with
vqfunc's.

Peak memory: on CPU, torch allocates through the C allocator, which `tracemalloc` does not see,
so peaks are read from the kernel: `/proc/self/clear_refs` resets the peak resident set size
(`VmHWM` in `/proc/self/status`), the call runs, and the new peak minus the resident size
before the call is the call's peak extra memory (freed heap is first returned with
`malloc_trim`, so it does not hide in the baseline). On CUDA, `torch.cuda` memory statistics.

Options: `--device cuda`, `--dtype`, `--threads`, `--repeats`, `--quick` (tiny shapes, used by
the test suite, which checks the codes, never the timings), `--memory` (peak extra memory
of `quantize` on N = 1,000,000, D = 64, K = 8192) and `--lfq BITS` (time and peak extra memory
of the loss of `vqfunc.lfq.quantize` at `BITS` bits on `--rows` vectors, forward and
forward+backward, next to the size of the `N x 2**BITS` table a full computation would hold).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from vqfunc._config import VQConfig
from vqfunc._params import VQParams, init_params
from vqfunc._quantize import quantize
from vqfunc._search import nearest_codes, uses_cpu_kernel
from vqfunc.lfq import LFQConfig
from vqfunc.lfq import quantize as lfq_quantize

FULL_SHAPES: tuple[tuple[int, int, int], ...] = (
    (65536, 8, 512),
    (65536, 8, 8192),
    (65536, 16, 2048),
    (65536, 32, 512),
    (65536, 32, 4096),
    (65536, 64, 1024),
    (65536, 64, 8192),
    (65536, 128, 2048),
    (16384, 256, 1024),
    (16384, 256, 16384),
    (262144, 32, 1024),
)
QUICK_SHAPES: tuple[tuple[int, int, int], ...] = ((300, 8, 64), (129, 64, 513))
MEMORY_SHAPE = (1_000_000, 64, 8192)
# The naive method builds the full N x K matrix; above this many bytes it is skipped.
_NAIVE_LIMIT_BYTES = 2 << 30
_MIB = float(1 << 20)
# Pause before each timed CPU call (see bench_shape).
_SETTLE_SECONDS = 0.02

__all__ = [
    "PeakMemory",
    "Row",
    "bench_shape",
    "format_table",
    "gemm_rate",
    "lfq_check",
    "main",
    "memory_check",
]


# ---------------------------------------------------------------------------------------------
# Peak memory


class PeakMemory:
    """Peak extra memory of a call on one device, in bytes (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu_supported = sys.platform.startswith("linux")
        try:
            self._libc: Any = ctypes.CDLL("libc.so.6")
        except OSError:
            self._libc = None

    def _status(self, field: str) -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not in /proc/self/status")

    def measure(self, fn: Callable[[], Any]) -> tuple[Any, int | None]:
        """Run `fn`; return its result and its peak extra memory (None if not measurable)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            result = fn()
            torch.cuda.synchronize(self.device)
            return result, torch.cuda.max_memory_allocated(self.device) - before
        if not self.cpu_supported:
            return fn(), None
        if self._libc is not None:
            self._libc.malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")
        except OSError:
            return fn(), None
        before = self._status("VmRSS")
        result = fn()
        return result, self._status("VmHWM") - before


# ---------------------------------------------------------------------------------------------
# Methods


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_rate(device: torch.device, dtype: torch.dtype, repeats: int, size: int = 2048) -> float:
    """FLOP/s of a `size`-square matrix product in `dtype`: the best of `max(repeats, 10)` runs,
    since the floor is what the hardware can do, and a busy machine only ever slows it."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    times = _time(lambda: a @ b, device, max(repeats, 10))
    return 2.0 * size**3 / min(times)


def _once(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _time(fn: Callable[[], Any], device: torch.device, repeats: int) -> list[float]:
    fn()
    return [_once(fn, device) for _ in range(repeats)]


def _faiss_index(codebook: torch.Tensor) -> Any | None:
    try:
        import faiss
    except ImportError:
        return None
    faiss.omp_set_num_threads(torch.get_num_threads())
    index = faiss.IndexFlatL2(codebook.shape[1])
    index.add(codebook.detach().float().cpu().contiguous().numpy())
    return index


def _naive(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    v = vectors.to(torch.promote_types(vectors.dtype, torch.float32))
    return torch.cdist(v, codebook.to(v.dtype)).argmin(-1)


@dataclass
class Row:
    """One shape's results: median seconds per method, peaks in bytes, code agreement."""

    shape: tuple[int, int, int]
    floor: float
    times: dict[str, float]
    peaks: dict[str, int | None]
    agreement: dict[str, float]


def _quantize_setup(
    n: int, d: int, k: int, device: torch.device, dtype: torch.dtype, gen: torch.Generator
) -> tuple[VQConfig, VQParams, torch.Tensor]:
    cfg = VQConfig(feature_size=d, num_codes=k, dim=-1)
    params = init_params(cfg, generator=gen)
    params = VQParams(*(t.to(device=device, dtype=dtype) for t in params))
    x = torch.randn(n, d, generator=gen).to(device=device, dtype=dtype)
    return cfg, params, x


def bench_shape(
    shape: tuple[int, int, int],
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
    rate: float,
) -> Row:
    """Time and compare every method on one shape."""
    n, d, k = shape
    gen = torch.Generator().manual_seed(n * 31 + d * 7 + k)
    cfg, params, x = _quantize_setup(n, d, k, device, dtype, gen)
    codebook = params.codebook
    leaf_params = VQParams(*(t.detach().requires_grad_(True) for t in params))
    leaf_x = x.detach().requires_grad_(True)

    def forward() -> Any:
        return quantize(leaf_params, leaf_x, cfg)

    def forward_backward() -> None:
        z_q, out = quantize(leaf_params, leaf_x, cfg)
        (z_q.float().sum() + out.loss).backward()
        leaf_x.grad = None
        for t in leaf_params:
            t.grad = None

    methods: dict[str, Callable[[], Any]] = {
        "search": lambda: nearest_codes(x, codebook)[0],
        "quantize fwd": forward,
        "quantize fwd+bwd": forward_backward,
    }
    if n * k * 4 <= _NAIVE_LIMIT_BYTES:
        methods["cdist"] = lambda: _naive(x, codebook)
    index = _faiss_index(codebook) if device.type == "cpu" else None
    if index is not None:
        x_np = x.float().contiguous().numpy()
        methods["faiss"] = lambda: torch.from_numpy(index.search(x_np, 1)[1][:, 0])

    for fn in methods.values():
        fn()  # warm-up: kernel loading, thread pools and allocator caches are not the call's
    meter = PeakMemory(device)
    reference, search_peak = meter.measure(methods["search"])
    peaks: dict[str, int | None] = {"search": search_peak}
    agreement: dict[str, float] = {}
    for name in ("quantize fwd", "cdist", "faiss"):
        if name not in methods:
            continue
        result, peaks[name] = meter.measure(methods[name])
        codes = result[1].codes if name == "quantize fwd" else result
        agreement[name] = (codes.to(reference.device) == reference).float().mean().item()
        del result, codes
    # Interleaved repeats: each round runs every method once, each after a pause in which the
    # worker threads of the method before (torch's and faiss's OpenMP pools spin-wait for a
    # while after each parallel region) go idle and hand the cores back.
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            if device.type == "cpu":
                time.sleep(_SETTLE_SECONDS)
            samples[name].append(_once(fn, device))
    times = {name: statistics.median(s) for name, s in samples.items()}
    return Row(shape, 2.0 * n * k * d / rate, times, peaks, agreement)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:9.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:5.2f}"


def format_table(rows: Sequence[Row]) -> str:
    """The results as a fixed-width text table."""
    head = (
        f"{'N':>8} {'D':>4} {'K':>6} | {'floor ms':>9} | {'search ms':>9} {'/floor':>6} "
        f"{'/faiss':>6} | {'faiss ms':>9} {'/floor':>6} | {'cdist ms':>9} {'/floor':>6} | "
        f"{'fwd ms':>9} {'fwd+bwd':>9} {'/fwd':>5} | {'peak MiB: search':>16} "
        f"{'quantize':>8} {'cdist':>8} {'faiss':>8} | agree"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        n, d, k = row.shape
        t = row.times
        peak = {
            name: "-" if value is None else f"{value / _MIB:8.1f}"
            for name in ("search", "quantize fwd", "cdist", "faiss")
            for value in [row.peaks.get(name)]
        }
        agree = min(row.agreement.values()) if row.agreement else 1.0
        lines.append(
            f"{n:>8} {d:>4} {k:>6} | {_ms(row.floor)} | {_ms(t['search'])} "
            f"{_ratio(t['search'], row.floor):>6} {_ratio(t['search'], t.get('faiss')):>6} | "
            f"{_ms(t.get('faiss'))} {_ratio(t.get('faiss'), row.floor):>6} | "
            f"{_ms(t.get('cdist'))} {_ratio(t.get('cdist'), row.floor):>6} | "
            f"{_ms(t['quantize fwd'])} {_ms(t['quantize fwd+bwd'])} "
            f"{_ratio(t['quantize fwd+bwd'], t['quantize fwd']):>5} | {peak['search']:>16} "
            f"{peak['quantize fwd']:>8} {peak['cdist']:>8} {peak['faiss']:>8} | {agree:.4f}"
        )
    return "\n".join(lines)


def memory_check(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Peak extra memory (MiB) on `MEMORY_SHAPE` of `nearest_codes` and of one `quantize`
    forward, with and without autograd. "peak" is the rise of the resident set during the call,
    "outputs" the size of the tensors returned, "extra" the difference (the workspace)."""
    n, d, k = MEMORY_SHAPE
    gen = torch.Generator().manual_seed(0)
    cfg, params, x = _quantize_setup(n, d, k, device, dtype, gen)
    meter = PeakMemory(device)
    quantize(params, x[:1000], cfg)  # loads the kernel and warms the allocator
    report: dict[str, float] = {}
    (codes, distances), peak = meter.measure(partial(nearest_codes, x, params.codebook))
    out_bytes = codes.nbytes + distances.nbytes
    report["search peak"] = (peak or 0) / _MIB
    report["search outputs"] = out_bytes / _MIB
    report["search extra"] = ((peak or 0) - out_bytes) / _MIB
    del codes, distances
    for label, grad in (("no_grad", False), ("autograd", True)):
        leaf = VQParams(*(t.detach().requires_grad_(grad) for t in params))
        with torch.set_grad_enabled(grad):
            result, peak = meter.measure(partial(quantize, leaf, x, cfg))
        z_q, out = result
        outputs = {z_q.untyped_storage().data_ptr(): z_q.untyped_storage().nbytes()}
        for t in out:
            outputs[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        outputs.pop(x.untyped_storage().data_ptr(), None)  # out.z may be a view of the input
        out_bytes = sum(outputs.values())
        report[f"{label} peak"] = (peak or 0) / _MIB
        report[f"{label} outputs"] = out_bytes / _MIB
        report[f"{label} extra"] = ((peak or 0) - out_bytes) / _MIB
        del result, z_q, out
    return report


def lfq_check(
    bits: int, rows: int, device: torch.device, dtype: torch.dtype, repeats: int
) -> dict[str, float]:
    """Median time (ms) and peak extra memory (MiB) of the LFQ loss at `bits` on `rows` random
    vectors (default `LFQConfig` otherwise): forward without autograd, and forward+backward;
    and the MiB of the float32 `rows x 2**bits` table that a full computation would hold."""
    cfg = LFQConfig(bits=bits, dim=-1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, bits, generator=gen).to(device=device, dtype=dtype)
    meter = PeakMemory(device)

    def forward() -> Any:
        with torch.no_grad():
            return lfq_quantize(x, cfg)[1].loss

    def forward_backward() -> Any:
        leaf = x.detach().requires_grad_()
        lfq_quantize(leaf, cfg)[1].loss.backward()
        return leaf.grad

    report: dict[str, float] = {}
    for label, fn in (("forward", forward), ("forward+backward", forward_backward)):
        times = _time(fn, device, repeats)
        _, peak = meter.measure(fn)
        report[f"{label} ms"] = 1e3 * statistics.median(times)
        report[f"{label} peak MiB"] = (peak or 0) / _MIB
    report["full table MiB"] = rows * (1 << bits) * 4 / _MIB
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vqfunc.bench", description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"]
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (for tests)")
    parser.add_argument("--memory", action="store_true", help="peak memory of quantize on 1e6")
    parser.add_argument(
        "--shapes", default=None, help="N,D,K;N,D,K;... instead of the built-in table"
    )
    parser.add_argument("--lfq", type=int, default=None, metavar="BITS", help="LFQ loss cost")
    parser.add_argument("--rows", type=int, default=4096, help="vectors for --lfq")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    probe = torch.zeros(1, 1, device=device, dtype=torch.promote_types(dtype, torch.float32))
    print(
        f"vqfunc.bench: device={device}, dtype={args.dtype}, threads={args.threads}, "
        f"repeats={args.repeats}, compiled CPU kernel in use: {uses_cpu_kernel(probe, probe)}"
    )
    if args.memory:
        report = memory_check(device, dtype)
        n, d, k = MEMORY_SHAPE
        print(f"quantize peak memory on N={n}, D={d}, K={k} (MiB):")
        for key, value in report.items():
            print(f"  {key:>18}: {value:9.1f}")
        return 0
    if args.lfq is not None:
        report = lfq_check(args.lfq, args.rows, device, dtype, args.repeats)
        print(f"vqfunc.lfq.quantize loss, bits={args.lfq}, N={args.rows}:")
        for key, value in report.items():
            print(f"  {key:>26}: {value:9.1f}")
        return 0
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    else:
        shapes = list(QUICK_SHAPES if args.quick else FULL_SHAPES)
    repeats = 1 if args.quick else args.repeats
    size = 512 if args.quick else 2048
    rate = gemm_rate(device, torch.promote_types(dtype, torch.float32), repeats, size)
    print(f"GEMM rate: {rate / 1e9:.1f} GFLOP/s ({size}^3, best run)")
    rows = []
    for shape in shapes:
        rows.append(bench_shape(shape, device, dtype, repeats, rate))  # type: ignore[arg-type]
        print(format_table(rows).splitlines()[-1], flush=True)  # progress, one line per shape
    print()
    print(format_table(rows))
    disagree = [r.shape for r in rows if r.agreement and min(r.agreement.values()) < 0.999]
    if disagree:
        print(f"codes disagree on {disagree}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
