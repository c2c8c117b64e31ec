"""The search table: vqfunc's search and quantize against cdist, faiss and the floor."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch

from vqfunc._config import VQConfig
from vqfunc._params import VQParams, init_params
from vqfunc._quantize import quantize
from vqfunc._search import nearest_codes
from vqfunc.bench._timing import _MIB, PeakMemory, _once

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
# Pause before each timed CPU call (see bench_shape).
_SETTLE_SECONDS = 0.02


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
    """One shape's results: seconds per method (best or median of the repeats), peaks in
    bytes, code agreement."""

    shape: tuple[int, int, int]
    floor: float
    peak_floor: float | None
    times: dict[str, float]
    peaks: dict[str, int | None]
    agreement: dict[str, float]

    def at_peak(self, peak: float) -> Row:
        """This row with its `2 N K D / peak` floor for the FMA peak `peak` (flop/s)."""
        n, d, k = self.shape
        return replace(self, peak_floor=2.0 * n * k * d / peak)


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
    peak: float | None = None,
    statistic: str = "best",
) -> Row:
    """Time and compare every method on one shape; `rate` is the GEMM rate and `peak` the FMA
    peak (flop/s, None when unknown) of the floors `2 N K D / rate` and `2 N K D / peak`.

    `statistic` is "best" (each method's fastest repeat: what the floors are too, since a busy
    machine only ever slows a call down) or "median". Besides the methods, "output writes"
    times writing the three `N x D` tensors `quantize` returns beyond the search's (`z`, the
    output and the codewords) with `fill_`: the memory traffic no fusion removes.
    """
    if statistic not in ("best", "median"):
        raise ValueError(f"statistic: expected 'best' or 'median', got {statistic!r}")
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
        "output writes": lambda: [x.new_empty(x.shape).fill_(0.0) for _ in range(3)],
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
    # while after each parallel region) go idle and hand the cores back. The pause also lets
    # the host put the cores to sleep and other work evict the data, which a call in a training
    # loop does not meet (its threads are busy and its inputs were just written): so each timed
    # call follows an untimed one of the same method, every method alike. Timed straight
    # after the pause, a 6 ms search cost 7-15 % more on a 2-core AMD EPYC, faiss's 0-4 %.
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            if device.type == "cpu":
                time.sleep(_SETTLE_SECONDS)
                fn()
            samples[name].append(_once(fn, device))
    pick = min if statistic == "best" else statistics.median
    times = {name: pick(s) for name, s in samples.items()}
    flops = 2.0 * n * k * d
    return Row(shape, flops / rate, None if peak is None else flops / peak, times, peaks, agreement)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:9.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:5.2f}"


def format_table(rows: Sequence[Row]) -> str:
    """The results as a fixed-width text table."""
    head = (
        f"{'N':>8} {'D':>4} {'K':>6} | {'floor ms':>9} {'peak ms':>8} | {'search ms':>9} "
        f"{'/floor':>6} {'/peak':>5} {'/faiss':>6} | {'faiss ms':>9} {'/floor':>6} | "
        f"{'cdist ms':>9} {'/floor':>6} | {'writes ms':>9} {'fwd ms':>9} {'/srch':>5} {'/s+w':>5} "
        f"{'fwd+bwd':>9} {'/fwd':>5} | "
        f"{'peak MiB: search':>16} "
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
            f"{n:>8} {d:>4} {k:>6} | {_ms(row.floor)} {_ms(row.peak_floor)[1:]:>8} | "
            f"{_ms(t['search'])} {_ratio(t['search'], row.floor):>6} "
            f"{_ratio(t['search'], row.peak_floor):>5} {_ratio(t['search'], t.get('faiss')):>6} | "
            f"{_ms(t.get('faiss'))} {_ratio(t.get('faiss'), row.floor):>6} | "
            f"{_ms(t.get('cdist'))} {_ratio(t.get('cdist'), row.floor):>6} | "
            f"{_ms(t['output writes'])} "
            f"{_ms(t['quantize fwd'])} {_ratio(t['quantize fwd'], t['search']):>5} "
            f"{_ratio(t['quantize fwd'], t['search'] + t['output writes']):>5} "
            f"{_ms(t['quantize fwd+bwd'])} "
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
