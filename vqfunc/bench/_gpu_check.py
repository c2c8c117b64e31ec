"""`python -m vqfunc.bench --gpu-check`: the CUDA tests and the CUDA benchmark in one call.

Meant for the first run on a machine with a GPU, in the repository root (where `tests/` is):

1. `pytest -m cuda tests` (the tests that need a CUDA device; they skip elsewhere), under a
   time limit;
2. the search and `quantize` on CUDA, torch path against the Triton kernel, in float32,
   float16 and bfloat16, interleaved, each as a median time, the ratio Triton / torch and the
   share of codes on which both agree (the float64 argmin settles near ties, so agreement
   slightly below 1 is expected in half precision).

It prints what the torch-or-Triton default of `vqfunc.kernels` should be decided on. Without a
CUDA device it says so and exits with status 2. `device` and `budget` keep it under five
minutes on one GPU.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vqfunc import kernels
from vqfunc._params import VQParams
from vqfunc._quantize import quantize
from vqfunc._search import nearest_codes
from vqfunc.bench._search import _quantize_setup
from vqfunc.bench._timing import _once

# (N, D, K): small and large batches, narrow and wide codes, small and large codebooks.
GPU_SHAPES: tuple[tuple[int, int, int], ...] = (
    (8192, 64, 1024),
    (65536, 32, 512),
    (65536, 64, 8192),
    (16384, 256, 16384),
    (262144, 32, 1024),
    (1048576, 64, 4096),
)
QUICK_GPU_SHAPES: tuple[tuple[int, int, int], ...] = ((300, 8, 64), (129, 64, 513))
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TEST_SECONDS = 240


@dataclass
class GpuRow:
    """One shape and dtype: median seconds per (backend, method), code agreement."""

    shape: tuple[int, int, int]
    dtype: torch.dtype
    times: dict[tuple[str, str], float]
    agreement: float


def run_cuda_tests(root: Path, seconds: int = _TEST_SECONDS) -> int:
    """`pytest -m cuda` on `root / "tests"`; its exit status (124 past `seconds`)."""
    tests = root / "tests"
    if not tests.is_dir():
        print(f"no tests folder at {tests}: run from the repository root to include the tests")
        return 0
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:randomly", str(tests)]
    print("$", " ".join(command), flush=True)
    try:
        return subprocess.run(command, cwd=root, timeout=seconds, check=False).returncode
    except subprocess.TimeoutExpired:
        print(f"the CUDA tests ran past {seconds} s")
        return 124


def bench_gpu_shape(
    shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device, repeats: int
) -> GpuRow:
    """Time the search, `quantize` forward and forward+backward on both CUDA backends."""
    n, d, k = shape
    gen = torch.Generator().manual_seed(n + 7 * d + 31 * k)
    cfg, params, x = _quantize_setup(n, d, k, device, dtype, gen)
    leaf = VQParams(*(t.detach().requires_grad_(True) for t in params))
    leaf_x = x.detach().requires_grad_(True)

    def forward_backward() -> None:
        z_q, out = quantize(leaf, leaf_x, cfg)
        (z_q.float().sum() + out.loss).backward()

    methods: dict[str, Callable[[], Any]] = {
        "search": lambda: nearest_codes(x, params.codebook)[0],
        "fwd": lambda: quantize(params, x, cfg),
        "fwd+bwd": forward_backward,
    }
    codes: dict[str, torch.Tensor] = {}
    for backend in kernels.CUDA_CHOICES:
        with kernels.use(cuda=backend):
            for fn in methods.values():
                fn()  # compiles and caches the kernels, warms the allocator
            codes[backend] = methods["search"]()
    samples: dict[tuple[str, str], list[float]] = {}
    for _ in range(repeats):
        for backend in kernels.CUDA_CHOICES:
            with kernels.use(cuda=backend):
                for name, fn in methods.items():
                    samples.setdefault((backend, name), []).append(_once(fn, device))
    times = {key: statistics.median(values) for key, values in samples.items()}
    agreement = (codes["torch"] == codes["triton"]).float().mean().item()
    return GpuRow(shape, dtype, times, agreement)


def format_gpu_table(rows: Sequence[GpuRow]) -> str:
    """The results as a fixed-width text table (ms, and Triton / torch ratios)."""
    head = (
        f"{'N':>8} {'D':>4} {'K':>6} {'dtype':>9} | {'search ms':>9} {'triton':>7} {'ratio':>5} | "
        f"{'fwd ms':>8} {'triton':>7} {'ratio':>5} | {'fwd+bwd':>8} {'triton':>7} {'ratio':>5} "
        "| agree"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        n, d, k = row.shape
        cells = []
        for name in ("search", "fwd", "fwd+bwd"):
            torch_s, triton_s = row.times[("torch", name)], row.times[("triton", name)]
            cells.append(f"{torch_s * 1e3:8.2f} {triton_s * 1e3:7.2f} {triton_s / torch_s:5.2f}")
        dtype = str(row.dtype).removeprefix("torch.")
        lines.append(
            f"{n:>8} {d:>4} {k:>6} {dtype:>9} | {cells[0]} | {cells[1]} | {cells[2]} "
            f"| {row.agreement:.4f}"
        )
    return "\n".join(lines)


def gpu_check(root: Path, *, quick: bool = False, repeats: int = 10) -> int:
    """The whole check: 0 when the tests pass (the table is printed either way)."""
    if not torch.cuda.is_available():
        print("vqfunc.bench --gpu-check: no CUDA device is visible; nothing to check")
        return 2
    device = torch.device("cuda")
    start = time.perf_counter()
    print(f"vqfunc.bench --gpu-check on {torch.cuda.get_device_name(device)}")
    for entry in kernels.status():
        if entry.device == "cuda" and entry.dtype == "float32":
            print(" ", entry)
    status = 0 if quick else run_cuda_tests(root)
    print(f"CUDA tests: exit status {status} ({time.perf_counter() - start:.0f} s so far)")
    with kernels.use(cuda="triton"):
        if not any(e.backend == "triton" for e in kernels.status() if e.device == "cuda"):
            print("the Triton search is not available here; no comparison to print")
            return status
    rows = []
    for shape in QUICK_GPU_SHAPES if quick else GPU_SHAPES:
        for dtype in DTYPES:
            rows.append(bench_gpu_shape(shape, dtype, device, 1 if quick else repeats))
            print(format_gpu_table(rows).splitlines()[-1], flush=True)
    print()
    print(format_gpu_table(rows))
    print(f"total {time.perf_counter() - start:.0f} s")
    return status
