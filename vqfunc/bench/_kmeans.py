"""The k-means table: `warmup_params(method="kmeans")` against faiss and scikit-learn.

For each shape `(N, D, K)` and each of a few seeds, on the same standard-normal data: vqfunc's
`warmup_params(method="kmeans")` (k-means|| seeding, then Lloyd), faiss `Kmeans` (its defaults:
seeds drawn uniformly from the data, at most 256 points per centroid) and scikit-learn `KMeans`
(`init="k-means++"`, `n_init=1`), all with the same number of Lloyd iterations and threads. The
error is the mean over all points of the squared distance to the nearest centroid, computed the
same way (in float64) for every method. Times and errors are medians over the seeds. Besides,
vqfunc's seeding alone and one nearest-code search of the data (vqfunc's and faiss
`IndexFlatL2`'s) split vqfunc's time into seeding and Lloyd and show the search rate each runs on.
A library that is not installed prints "-".
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from vqfunc._config import VQConfig
from vqfunc._kmeans import kmeans_parallel
from vqfunc._params import init_params
from vqfunc._search import nearest_codes
from vqfunc._warmup import warmup_params

KMEANS_SHAPES: tuple[tuple[int, int, int], ...] = (
    (8192, 32, 1024),
    (65536, 64, 512),
    (65536, 16, 4096),
    (32768, 32, 16384),
)
KMEANS_QUICK_SHAPES: tuple[tuple[int, int, int], ...] = ((600, 8, 16), (256, 4, 64))
KMEANS_ITERS = 20
KMEANS_SEEDS = 3
# Pause before each timed call, so that no method pays for the threads the one before left spinning.
_SETTLE_SECONDS = 0.05
_METHODS = ("vqfunc", "faiss", "sklearn")


@dataclass
class KMeansRow:
    """One shape's medians: seconds and errors per method (None: not installed)."""

    shape: tuple[int, int, int]
    times: dict[str, float | None] = field(default_factory=dict)
    errors: dict[str, float | None] = field(default_factory=dict)
    # vqfunc's seeding alone, and one search of the data by vqfunc and by faiss (seconds).
    parts: dict[str, float | None] = field(default_factory=dict)


def kmeans_error(data: torch.Tensor, centroids: torch.Tensor) -> float:
    """Mean over the rows of `data` `[N, D]` of the squared distance to the nearest row of
    `centroids` `[K, D]`, in float64 (nearest codes found in float32, distances recomputed)."""
    centroids = centroids.to(data.device, torch.float32)
    codes, _ = nearest_codes(data.float(), centroids)
    diff = data.double() - centroids.double()[codes]
    return float(diff.square().sum(-1).mean())


def _vqfunc(data: torch.Tensor, k: int, iters: int, seed: int) -> torch.Tensor:
    cfg = VQConfig(feature_size=data.shape[1], num_codes=k, dim=-1)
    params = init_params(cfg, generator=torch.Generator().manual_seed(seed), device=data.device)
    generator = torch.Generator(device=data.device).manual_seed(seed)
    fitted = warmup_params(
        params, data, cfg, method="kmeans", generator=generator, kmeans_iters=iters
    )
    return fitted.codebook


def _faiss(data: torch.Tensor, k: int, iters: int, seed: int) -> torch.Tensor | None:
    try:
        import faiss
    except ImportError:
        return None
    faiss.omp_set_num_threads(torch.get_num_threads())
    model = faiss.Kmeans(data.shape[1], k, niter=iters, seed=seed + 1, verbose=False)
    model.train(data.float().cpu().contiguous().numpy())
    return torch.from_numpy(model.centroids)


def _sklearn(data: torch.Tensor, k: int, iters: int, seed: int) -> torch.Tensor | None:
    try:
        from sklearn.cluster import KMeans
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    model = KMeans(n_clusters=k, init="k-means++", n_init=1, max_iter=iters, random_state=seed)
    with threadpool_limits(limits=torch.get_num_threads()):
        model.fit(data.float().cpu().numpy())
    return torch.from_numpy(model.cluster_centers_).float()


def _faiss_search(data: torch.Tensor, codebook: torch.Tensor) -> Callable[[], Any] | None:
    try:
        import faiss
    except ImportError:
        return None
    faiss.omp_set_num_threads(torch.get_num_threads())
    index = faiss.IndexFlatL2(codebook.shape[1])
    index.add(codebook.float().cpu().contiguous().numpy())
    rows = data.float().cpu().contiguous().numpy()
    return lambda: index.search(rows, 1)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    if device.type == "cpu":
        time.sleep(_SETTLE_SECONDS)
    else:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def _median(values: Sequence[float | None]) -> float | None:
    return None if not values or values[0] is None else statistics.median(values)  # type: ignore[type-var]


def kmeans_row(
    shape: tuple[int, int, int],
    device: torch.device,
    *,
    iters: int = KMEANS_ITERS,
    seeds: int = KMEANS_SEEDS,
) -> KMeansRow:
    """Time and score every method on one shape, `seeds` times (interleaved)."""
    n, d, k = shape
    runners = {"vqfunc": _vqfunc, "faiss": _faiss, "sklearn": _sklearn}
    times: dict[str, list[float | None]] = {name: [] for name in _METHODS}
    errors: dict[str, list[float | None]] = {name: [] for name in _METHODS}
    parts: dict[str, list[float | None]] = {"seeding": [], "search": [], "faiss search": []}
    for seed in range(seeds):
        data = torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).to(device)
        for name in _METHODS:
            centroids, seconds = _timed(partial(runners[name], data, k, iters, seed), device)
            times[name].append(None if centroids is None else seconds)
            errors[name].append(None if centroids is None else kmeans_error(data, centroids))
        generator = torch.Generator(device=device).manual_seed(seed)
        _, seconds = _timed(partial(kmeans_parallel, data, k, generator=generator), device)
        parts["seeding"].append(seconds)
        codebook = data[:k].contiguous()
        _, seconds = _timed(partial(nearest_codes, data, codebook), device)
        parts["search"].append(seconds)
        search = _faiss_search(data, codebook) if device.type == "cpu" else None
        parts["faiss search"].append(None if search is None else _timed(search, device)[1])
    return KMeansRow(
        shape,
        {name: _median(v) for name, v in times.items()},
        {name: _median(v) for name, v in errors.items()},
        {name: _median(v) for name, v in parts.items()},
    )


def _cell(value: float | None, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}{spec}}"


def format_kmeans_table(rows: Sequence[KMeansRow]) -> str:
    """The results as a fixed-width text table (seconds; errors as defined above)."""
    head = (
        f"{'N':>7} {'D':>4} {'K':>6} | {'vqfunc s':>8} {'error':>9} | {'faiss s':>8} "
        f"{'error':>9} | {'sklearn s':>9} {'error':>9} | {'vq/faiss':>8} | "
        f"{'seeding s':>9} {'search ms':>9} {'faiss ms':>9}"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        n, d, k = row.shape
        t, e, p = row.times, row.errors, row.parts
        vq, fa = t.get("vqfunc"), t.get("faiss")
        ratio = None if vq is None or fa is None else vq / fa
        search = p.get("search")
        faiss_search = p.get("faiss search")
        lines.append(
            f"{n:>7} {d:>4} {k:>6} | {_cell(vq, '.3f', 8)} {_cell(e.get('vqfunc'), '.4f', 9)} | "
            f"{_cell(fa, '.3f', 8)} {_cell(e.get('faiss'), '.4f', 9)} | "
            f"{_cell(t.get('sklearn'), '.3f', 9)} {_cell(e.get('sklearn'), '.4f', 9)} | "
            f"{_cell(ratio, '.2f', 8)} | {_cell(p.get('seeding'), '.3f', 9)} "
            f"{_cell(None if search is None else 1e3 * search, '.1f', 9)} "
            f"{_cell(None if faiss_search is None else 1e3 * faiss_search, '.1f', 9)}"
        )
    return "\n".join(lines)


def run_kmeans(shapes: Sequence[tuple[int, int, int]], device: torch.device) -> int:
    """Print the table for `shapes`, one progress line per shape; 1 if an error is not finite."""
    rows: list[KMeansRow] = []
    print(f"k-means, {KMEANS_ITERS} iterations, median of {KMEANS_SEEDS} seeds:")
    for shape in shapes:
        rows.append(kmeans_row(shape, device))
        print(format_kmeans_table(rows).splitlines()[-1], flush=True)
    print()
    print(format_kmeans_table(rows))
    errors = [v for row in rows for v in row.errors.values() if v is not None]
    return 0 if all(math.isfinite(v) for v in errors) else 1
