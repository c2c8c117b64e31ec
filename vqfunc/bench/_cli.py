"""The command line of `python -m vqfunc.bench`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

import vqfunc.bench as _package
from vqfunc._command_line import positive_int
from vqfunc._search import uses_cpu_kernel
from vqfunc.bench._allocator import retain_freed_memory
from vqfunc.bench._gpu_check import gpu_check
from vqfunc.bench._kmeans import KMEANS_QUICK_SHAPES, KMEANS_SHAPES, run_kmeans
from vqfunc.bench._lfq import lfq_check
from vqfunc.bench._paths import compare_paths, paths_argument
from vqfunc.bench._peak import fma_peak
from vqfunc.bench._search import (
    FULL_SHAPES,
    MEMORY_SHAPE,
    QUICK_SHAPES,
    bench_shape,
    format_table,
    memory_check,
)
from vqfunc.bench._timing import gemm_rate


def shapes_argument(text: str) -> list[tuple[int, int, int]]:
    """`--shapes`: `"N,D,K;N,D,K;..."` as a list of `(N, D, K)`, each a positive integer."""
    shapes = []
    for part in text.split(";"):
        fields = part.split(",")
        try:
            shape = tuple(int(f) for f in fields)
        except ValueError:
            shape = ()
        if len(shape) != 3 or min(shape) < 1:
            raise argparse.ArgumentTypeError(
                f"got {text!r}: {part!r} is not three positive integers N,D,K; expected "
                f"shapes as N,D,K separated by ';' (e.g. '65536,32,512;4096,256,8192')"
            )
        shapes.append((shape[0], shape[1], shape[2]))
    return shapes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vqfunc.bench", description=_package.__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"]
    )
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument(
        "--statistic",
        default="best",
        choices=["best", "median"],
        help="each method's time on a shape: its fastest repeat (as the floors) or the median",
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes (for tests)")
    parser.add_argument("--memory", action="store_true", help="peak memory of quantize on 1e6")
    parser.add_argument(
        "--shapes",
        type=shapes_argument,
        default=None,
        help="N,D,K;N,D,K;... instead of the built-in table",
    )
    parser.add_argument(
        "--lfq", type=positive_int, default=None, metavar="BITS", help="LFQ loss cost"
    )
    parser.add_argument("--rows", type=positive_int, default=4096, help="vectors for --lfq")
    parser.add_argument(
        "--gpu-check",
        action="store_true",
        help="the CUDA tests, then torch against Triton on CUDA (run in the repository root)",
    )
    parser.add_argument("--kmeans", action="store_true", help="k-means vs faiss and sklearn")
    parser.add_argument(
        "--paths",
        type=paths_argument,
        default=None,
        metavar="A,B,...",
        help="the CPU search on these ISA paths of the kernels, side by side (e.g. avx512,amx)",
    )
    parser.add_argument(
        "--allocator",
        default="retain",
        choices=["retain", "system"],
        help="retain: glibc keeps freed memory for reuse (mallopt); system: its defaults",
    )
    args = parser.parse_args(argv)
    if args.gpu_check:
        return gpu_check(Path.cwd(), quick=args.quick)
    allocator = "system defaults"
    if args.allocator == "retain":
        allocator = "freed memory retained" if retain_freed_memory() else "system (not glibc)"
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    probe = torch.zeros(1, 1, device=device, dtype=torch.promote_types(dtype, torch.float32))
    print(
        f"vqfunc.bench: device={device}, dtype={args.dtype}, threads={args.threads}, "
        f"repeats={args.repeats} ({args.statistic}), "
        f"compiled CPU kernel in use: {uses_cpu_kernel(probe, probe)}, "
        f"malloc: {allocator}"
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
        shapes = args.shapes
    elif args.kmeans:
        shapes = list(KMEANS_QUICK_SHAPES if args.quick else KMEANS_SHAPES)
    else:
        shapes = list(QUICK_SHAPES if args.quick else FULL_SHAPES)
    if args.kmeans:
        return run_kmeans(shapes, device)
    if args.paths:
        try:
            table, same = compare_paths(
                args.paths, shapes, 1 if args.quick else args.repeats, args.statistic
            )
        except RuntimeError as error:  # a path this CPU does not run
            parser.error(str(error))
        print(table)
        return 0 if same else 1
    repeats = 1 if args.quick else args.repeats
    size = 512 if args.quick else 2048
    rate = gemm_rate(device, torch.promote_types(dtype, torch.float32), repeats, size)
    peak = fma_peak(repeats) if device.type == "cpu" else None
    print(
        f"GEMM rate: {rate / 1e9:.1f} GFLOP/s ({size}^3, best run); "
        + ("FMA peak: -" if peak is None else f"ISA {peak} (best run)")
    )
    rows = []
    probes = [] if peak is None else [peak.rate]
    for shape in shapes:
        rows.append(
            bench_shape(
                *(shape, device, dtype, repeats, rate, peak and peak.rate),  # type: ignore[arg-type]
                statistic=args.statistic,
            )
        )
        print(format_table(rows).splitlines()[-1], flush=True)  # progress, one line per shape
        # The peak again after each shape: a busy host slows the probe as it slows the
        # methods, and the floor is the fastest the cores went in the whole run.
        again = fma_peak(repeats) if peak is not None else None
        if again is not None:
            probes.append(again.rate)
    if peak is not None and len(probes) > 1:
        rows = [row.at_peak(max(probes)) for row in rows]
        print(
            f"FMA peak over the run: {max(probes) / 1e9:.1f} GFLOP/s, the best of "
            f"{len(probes)} probes (the slowest {min(probes) / 1e9:.1f}); /peak uses it"
        )
    print()
    print(format_table(rows))
    disagree = [r.shape for r in rows if r.agreement and min(r.agreement.values()) < 0.999]
    if disagree:
        print(f"codes disagree on {disagree}")
        return 1
    return 0
