"""k-means in pure torch (any device): k-means|| seeding, then Lloyd iterations.

Seeding is k-means|| (Bahmani et al., 2012): a bounded number of rounds, each of which samples
every point independently with probability `min(1, l d^2 / phi)` (`d^2` its squared distance to
the nearest candidate so far, `phi` their sum, `l` the oversampling) and searches the data
against the new candidates only. The candidates, weighted by the number of points nearest to
each, are then reduced to `k` seeds by weighted k-means++ drawn in a bounded number of batches.
When the rounds would draw about as many candidates as there are points, every point is a
candidate of weight 1 and the rounds are skipped. The rounds run on a uniform subset of at
most `64 k` points. Its cost is a few searches, never `k` sequential passes, and it reads the
device once per round (the number of candidates drawn), never once per seed.

Every assignment reuses the library's chunked nearest-code search, so memory stays bounded by
one search chunk, never `M x k`. The centroid update is deterministic: on CPU, for float32
rows, one compiled pass (`vqfunc._kernels.cluster_sums_cpu`, each thread owning a range of
codes), else `index_add_` (serial); elsewhere a stable sort and segment sums (atomic adds would
not be deterministic). An emptied cluster is re-seeded next to the centroid of a cluster drawn
in proportion to its size, with a small perturbation, so no centroid is wasted. Lloyd stops at
a fixed point (the same codes twice, no cluster empty), where further iterations would change
nothing: the result is that of every iteration asked for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vqfunc._kernels import cluster_sums_cpu as _cluster_sums_cpu
from vqfunc._search import nearest_codes

# k-means|| rounds and total oversampling (candidates drawn over all rounds, in units of k), and
# the batches of the weighted k-means++ that draws the k seeds among the candidates (one seed per
# batch up to this many seeds). Measured on standard-normal data (N, D, K = 8192/32/1024,
# 65536/64/512, 65536/16/4096, 32768/32/16384; 4 seeds, 20 Lloyd iterations after): 3 rounds
# drawing 2 k candidates and 8 batches end below the error of uniformly drawn seeds on every
# shape and seed, at 2 to 6 searches of the data; 5 rounds, 3 k and 64 batches, followed by 2
# weighted Lloyd iterations on the candidates, cost 6 to 17 searches and ended above it on two
# shapes (the many small batches and the candidate iterations pull the seeds to the tails).
_ROUNDS = 3
_OVERSAMPLING = 2.0
_REDUCE_BATCHES = 8
# Up to this many seeds, the settings that find every cluster of well separated mixtures about
# as often as k-means++ (`tests/core/test_kmeans.py`; with 3 rounds of 2 k, 1 run in 12 missed
# one of 16 clusters): 5 rounds drawing 3 k candidates, and one seed per batch (batches of
# several can put two seeds in one cluster and none in another, which Lloyd does not undo).
# So few seeds cost little either way.
_FEW_SEEDS = 64
_FEW_ROUNDS = 5
_FEW_OVERSAMPLING = 3.0
# The rounds run on a uniform subset of at most this many points per centroid.
_SEED_POINTS_PER_CODE = 64
# Relative size of the perturbation that splits a cluster into an emptied one.
_SPLIT_NOISE = 1e-3


def _sample_indices(
    count: int, high: int, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """`count` distinct indices in `[0, high)`, drawn with `generator`, on `device`."""
    gen_device = generator.device if generator is not None else device
    return torch.randperm(high, generator=generator, device=gen_device)[:count].to(device)


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Uniform `[0, 1)` draws of `shape` from `generator`, in `like`'s dtype and device."""
    gen_device = generator.device if generator is not None else like.device
    draws = torch.rand(shape, generator=generator, device=gen_device)
    return draws.to(like.device, like.dtype)


def kmeans_plus_plus(data: Tensor, k: int, *, generator: torch.Generator | None = None) -> Tensor:
    """k-means++ seeds (Arthur & Vassilvitskii, 2007): `[M, d]` data -> `[k, d]` centroids.

    Each new seed is drawn with probability proportional to its squared distance to the
    nearest seed so far. Needs `M >= k`. Sequential in `k` (one pass over the data per seed):
    the reference against which `kmeans_parallel` is tested, not what `kmeans` runs.
    """
    m = data.shape[0]
    gen_device = generator.device if generator is not None else data.device
    first = _sample_indices(1, m, generator, data.device)
    seeds = [data[first[0]]]
    closest = (data - seeds[0]).square().sum(-1)
    for _ in range(1, k):
        weights = closest.to(gen_device, torch.float64)
        if not bool(weights.sum() > 0):  # all points coincide with seeds: draw uniformly
            weights = torch.ones_like(weights)
        pick = torch.multinomial(weights, 1, generator=generator).to(data.device)
        seeds.append(data[pick[0]])
        closest = torch.minimum(closest, (data - seeds[-1]).square().sum(-1))
    return torch.stack(seeds)


def oversampling_probabilities(closest: Tensor, oversampling: float) -> Tensor:
    """k-means|| sampling probabilities `min(1, l d^2 / sum d^2)` `[M]` from `d^2` `[M]`.

    All zero when every point sits on a candidate (nothing left to sample).
    """
    total = closest.sum()
    scaled = closest * (oversampling / total.clamp_min(torch.finfo(closest.dtype).tiny))
    return torch.where(total > 0, scaled.clamp(max=1.0), torch.zeros_like(scaled))


def kmeans_parallel_candidates(
    data: Tensor,
    k: int,
    *,
    rounds: int = _ROUNDS,
    oversampling: float = _OVERSAMPLING,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The k-means|| candidates `[C, d]` of `[M, d]` data and their weights `[C]`.

    One uniformly drawn point, then `rounds` rounds that each draw every point independently
    with `oversampling_probabilities(d^2, oversampling * k / rounds)`. A candidate's weight is
    the number of points whose nearest candidate it is (the first one on ties); the weights
    sum to `M`.
    """
    m = data.shape[0]
    candidates = data[_sample_indices(1, m, generator, data.device)]
    closest = (data - candidates[0]).square().sum(-1)
    owner = torch.zeros(m, dtype=torch.long, device=data.device)
    per_round = oversampling * k / max(rounds, 1)
    for _ in range(rounds):
        chance = oversampling_probabilities(closest, per_round)
        picked = (_uniform((m,), generator, chance) < chance).nonzero().squeeze(1)
        if picked.numel() == 0:  # one device read per round; nothing left to sample
            break
        new = data[picked]
        codes, distances = nearest_codes(data, new)
        squared = distances.to(closest.dtype).square()
        closer = squared < closest
        closest = torch.where(closer, squared, closest)
        owner = torch.where(closer, codes + candidates.shape[0], owner)
        candidates = torch.cat([candidates, new])
    weights = torch.bincount(owner, minlength=candidates.shape[0]).to(data.dtype)
    return candidates, weights


def _cluster_stats(
    data: Tensor, codes: Tensor, k: int, weights: Tensor | None
) -> tuple[Tensor, Tensor]:
    """`[k, d]` sums of the (weighted) rows of `data` `[M, d]` per code and the `[k]` (weighted)
    number of rows per code, in `data`'s dtype, deterministically.

    Unweighted float32 rows on CPU take the compiled kernel (`cluster_sums_cpu`: one parallel
    pass, each code's rows added in row order); other CPU tensors `index_add_` (serial, in the
    same order); other devices a stable sort and segment sums (atomic adds would not be
    deterministic).
    """
    if weights is None and _cluster_sums_cpu.applies(data, codes):
        sums, counts = _cluster_sums_cpu.cluster_sums(data, codes, k)
        return sums, counts.to(data.dtype)
    return _cluster_sums(data, codes, k, weights), _cluster_counts(codes, k, weights, data)


def _cluster_sums(data: Tensor, codes: Tensor, k: int, weights: Tensor | None) -> Tensor:
    """`[k, d]` sums of the (weighted) rows of `data` `[M, d]` per code, in torch."""
    rows = data if weights is None else data * weights.unsqueeze(-1)
    if data.device.type == "cpu":
        return data.new_zeros(k, data.shape[1]).index_add_(0, codes, rows)
    order = torch.argsort(codes, stable=True)
    lengths = torch.bincount(codes, minlength=k)
    return torch.segment_reduce(rows[order], "sum", lengths=lengths, axis=0, unsafe=True)


def _cluster_counts(codes: Tensor, k: int, weights: Tensor | None, like: Tensor) -> Tensor:
    """`[k]` (weighted) number of rows per code, in `like`'s dtype, in torch."""
    if weights is None:
        return torch.bincount(codes, minlength=k).to(like.dtype)
    if like.device.type == "cpu":
        return like.new_zeros(k).index_add_(0, codes, weights)
    return _cluster_sums(weights.unsqueeze(-1), codes, k, None).squeeze(-1)


def _split_into_empty(
    centroids: Tensor, counts: Tensor, means: Tensor, generator: torch.Generator | None
) -> Tensor:
    """New centroids: `means` where a cluster is populated; a perturbed copy of the centroid of
    a populated cluster (drawn in proportion to its size) where it is empty.

    The draws are made for every cluster, so no device read decides how many to make.
    """
    k, d = centroids.shape
    size = counts.to(torch.float64)
    if k < 2:
        return torch.where((counts > 0).unsqueeze(-1), means, centroids)
    donors_weight = (size - 1).clamp_min(0) + (size > 0).to(size.dtype) * 1e-12
    gen_device = generator.device if generator is not None else centroids.device
    donors = torch.multinomial(
        donors_weight.to(gen_device), k, replacement=True, generator=generator
    ).to(centroids.device)
    scale = means.abs().amax().clamp_min(torch.finfo(means.dtype).tiny)
    noise = (2 * _uniform((k, d), generator, means) - 1) * (_SPLIT_NOISE * scale)
    replacement = means[donors] + noise
    return torch.where((counts > 0).unsqueeze(-1), means, replacement)


def _lloyd(
    data: Tensor,
    centroids: Tensor,
    *,
    iters: int,
    spherical: bool,
    weights: Tensor | None = None,
    generator: torch.Generator | None = None,
    split: bool = False,
) -> Tensor:
    """Weighted Lloyd; with `split`, emptied clusters are re-seeded (`_split_into_empty`).

    Stops early at a fixed point: when an iteration assigns every row to the same code as
    the one before (and, with `split`, leaves no cluster empty), the update would reproduce
    the centroids bit for bit (the sums are deterministic), so every later iteration would
    too, and the result is that of all `iters` iterations. The split's draws are made only in
    an iteration that empties a cluster. Two device reads per iteration (whether a cluster is
    empty, whether the codes changed) decide both.
    """
    k = centroids.shape[0]
    previous: Tensor | None = None
    for _ in range(iters):
        codes, _ = nearest_codes(data, centroids)
        sums, counts = _cluster_stats(data, codes, k, weights)
        populated = counts > 0
        full = bool(populated.all())
        if (full or not split) and previous is not None and torch.equal(codes, previous):
            break
        previous = codes
        means = sums / counts.clamp_min(torch.finfo(data.dtype).tiny).unsqueeze(-1)
        if full:
            centroids = means
        elif split:
            centroids = _split_into_empty(centroids, counts, means, generator)
        else:
            centroids = torch.where(populated.unsqueeze(-1), means, centroids)
        if spherical:
            centroids = F.normalize(centroids, dim=-1)
    return centroids


def lloyd(data: Tensor, centroids: Tensor, *, iters: int, spherical: bool = False) -> Tensor:
    """`iters` Lloyd iterations from `centroids` `[k, d]` on `data` `[M, d]`.

    An empty cluster keeps its previous centroid. With `spherical=True`, centroids are
    re-normalised to unit length after each mean (spherical k-means, for cosine codebooks).
    """
    return _lloyd(data, centroids, iters=iters, spherical=spherical)


def weighted_plus_plus(
    points: Tensor,
    weights: Tensor,
    k: int,
    *,
    batches: int = _REDUCE_BATCHES,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Indices `[k]` of `k` distinct rows of `points` `[C, d]` (`C >= k`) drawn by weighted
    k-means++ in `min(k, batches)` batches.

    Each batch draws its share of the `k` rows without replacement with probability
    proportional to `weight x d^2` (`d` the distance to the nearest row drawn so far), then
    searches the points against the batch. With `batches >= k` this is weighted k-means++ one
    seed at a time; fewer batches cost fewer passes. Rows that may no longer be drawn by
    `weight x d^2` (zero weight, or on a drawn row) keep a vanishing chance, so `k` rows
    always exist; no device read decides anything.
    """
    c = points.shape[0]
    gen_device = generator.device if generator is not None else points.device
    size = -(-k // max(1, min(k, batches)))
    chosen = torch.zeros(c, dtype=torch.bool, device=points.device)
    closest = torch.full((c,), torch.inf, dtype=torch.float64, device=points.device)
    mass = weights.to(torch.float64)
    picks = []
    for start in range(0, k, size):
        count = min(size, k - start)
        score = torch.where(torch.isinf(closest), mass, mass * closest)
        floor = score.sum() * 1e-12 + torch.finfo(torch.float64).tiny
        chance = torch.where(chosen, torch.zeros_like(score), score + floor)
        pick = torch.multinomial(chance.to(gen_device), count, generator=generator)
        pick = pick.to(points.device)
        picks.append(pick)
        chosen[pick] = True
        _, distances = nearest_codes(points, points[pick])
        closest = torch.minimum(closest, distances.to(torch.float64).square())
    return torch.cat(picks)


def kmeans_parallel(
    data: Tensor,
    k: int,
    *,
    rounds: int | None = None,
    oversampling: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """k-means|| seeds `[k, d]` of `[M, d]` data (`M >= k`).

    The candidates of `kmeans_parallel_candidates` (`rounds` and `oversampling` None: 3 rounds
    of 2 k candidates in all, or 5 rounds of 3 k up to 64 seeds), or every point with weight 1
    when the rounds would draw about as many (`1 + oversampling * k >= M`); when there are more
    than `k`, `k` of them are drawn by `weighted_plus_plus`, in 8 batches (one seed per batch up
    to 64 seeds); when there are fewer (few distinct points), the seeds are completed with
    uniformly drawn data points.
    """
    few = k <= _FEW_SEEDS
    if rounds is None:
        rounds = _FEW_ROUNDS if few else _ROUNDS
    if oversampling is None:
        oversampling = _FEW_OVERSAMPLING if few else _OVERSAMPLING
    if 1 + oversampling * k >= data.shape[0]:
        candidates = data
        weights = torch.ones(data.shape[0], dtype=data.dtype, device=data.device)
    else:
        candidates, weights = kmeans_parallel_candidates(
            data, k, rounds=rounds, oversampling=oversampling, generator=generator
        )
    c = candidates.shape[0]
    if c <= k:
        extra = data[_sample_indices(k - c, data.shape[0], generator, data.device)]
        return torch.cat([candidates, extra])
    batches = k if few else _REDUCE_BATCHES
    picks = weighted_plus_plus(candidates, weights, k, batches=batches, generator=generator)
    return candidates[picks]


def kmeans(
    data: Tensor,
    k: int,
    *,
    iters: int = 20,
    spherical: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """k-means|| seeding (on a uniform subset of at most `64 k` points), then `iters` Lloyd
    iterations on all of `data`, re-seeding emptied clusters by splitting populated ones.

    Args:
        data: `[M, d]` floating tensor, `M >= k`.
        k: number of centroids.
        iters: Lloyd iterations.
        spherical: normalise data and centroids (cosine k-means).
        generator: source of randomness; the same seed gives bit-identical centroids.

    Returns:
        `[k, d]` centroids in `data`'s dtype.

    Raises:
        ValueError: when `k` is not an int in `[1, M]`.
    """
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= data.shape[0]:
        raise ValueError(
            f"kmeans: k must be an int in [1, M] for data of M = {data.shape[0]} rows, got {k!r}"
        )
    if spherical:
        data = F.normalize(data, dim=-1)
    subset = data
    if data.shape[0] > _SEED_POINTS_PER_CODE * k:
        subset = data[
            _sample_indices(_SEED_POINTS_PER_CODE * k, data.shape[0], generator, data.device)
        ]
    seeds = kmeans_parallel(subset, k, generator=generator)
    if spherical:
        seeds = F.normalize(seeds, dim=-1)
    return _lloyd(data, seeds, iters=iters, spherical=spherical, generator=generator, split=True)
