"""`python -m vqfunc.bench --paths A,B,...`: the CPU search on several ISA paths of the compiled
kernels, side by side in one run. Each repeat calls every path once, in turn, so a busy host
slows them alike; each path's time is its best (or median) repeat, after one untimed call. The
last columns are each path's time over the first one's and whether every path found the same
codes (the paths are exact: they must)."""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence

import torch

import vqfunc
from vqfunc._kernels import cpu as _cpu_kernel
from vqfunc._search import nearest_codes
from vqfunc.bench._timing import _once


def paths_argument(text: str) -> list[str]:
    """`--paths`: ISA paths of the CPU kernels separated by ',', at least one."""
    paths = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in paths if p not in _cpu_kernel.ISA_PATHS]
    if not paths or unknown:
        raise argparse.ArgumentTypeError(
            f"got {text!r}: expected ISA paths of the CPU kernels separated by ',', each one of "
            f"{', '.join(_cpu_kernel.ISA_PATHS)} (e.g. 'avx512,amx')"
        )
    return paths


def _timed_search(path: str, vectors: torch.Tensor, codebook: torch.Tensor) -> float:
    """Seconds of one search of `vectors` against `codebook` on ISA path `path`."""
    with vqfunc.kernels.use(cpu="require", cpu_isa=path):
        return _once(lambda: nearest_codes(vectors, codebook), vectors.device)


def compare_paths(
    paths: Sequence[str], shapes: Sequence[tuple[int, int, int]], repeats: int, statistic: str
) -> tuple[str, bool]:
    """The table of the search on `paths` for each `(N, D, K)` of `shapes`, and whether every
    path found the same codes on every shape. Raises `RuntimeError` naming a path this CPU
    does not run."""
    if not _cpu_kernel.available():
        raise RuntimeError(
            f"--paths: the compiled CPU kernel is not available ({_cpu_kernel.failure()})"
        )
    missing = [p for p in paths if p not in _cpu_kernel.isa_paths()]
    if missing:
        raise RuntimeError(
            f"--paths: this CPU does not run {', '.join(missing)} (it runs "
            f"{', '.join(_cpu_kernel.isa_paths())})"
        )
    pick = min if statistic == "best" else statistics.median
    header = f"{'N':>7} {'D':>4} {'K':>6} | " + " ".join(f"{p + ' ms':>11}" for p in paths)
    header += " | " + " ".join(f"{'/' + paths[0]:>9}" for _ in paths[1:]) + " | same codes"
    lines = [header, "-" * len(header)]
    same_everywhere = True
    for n, d, k in shapes:
        g = torch.Generator().manual_seed(n + d + k)
        vectors, codebook = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
        codes: dict[str, torch.Tensor] = {}
        times: dict[str, list[float]] = {p: [] for p in paths}
        for path in paths:
            with vqfunc.kernels.use(cpu="require", cpu_isa=path):
                codes[path] = nearest_codes(vectors, codebook)[0]
        for _ in range(repeats):
            for path in paths:
                times[path].append(_timed_search(path, vectors, codebook))
        ms = {p: 1e3 * pick(times[p]) for p in paths}
        same = all(torch.equal(codes[p], codes[paths[0]]) for p in paths)
        same_everywhere &= same
        line = f"{n:>7} {d:>4} {k:>6} | " + " ".join(f"{ms[p]:>11.2f}" for p in paths)
        line += " | " + " ".join(f"{ms[p] / ms[paths[0]]:>9.3f}" for p in paths[1:])
        lines.append(line + f" | {'yes' if same else 'NO'}")
    return "\n".join(lines), same_everywhere
