"""k-means in pure torch (any device): k-means++ seeding, then Lloyd iterations.

The assignment step reuses the library's chunked nearest-code search, so memory stays bounded
by one search chunk, never `N x K`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vqfunc._search import nearest_codes

# k-means++ seeding is sequential in k; it runs on a random subset of this many points per code.
_SEED_POINTS_PER_CODE = 16


def _sample_indices(
    count: int, high: int, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """`count` distinct indices in `[0, high)`, drawn with `generator`, on `device`."""
    gen_device = generator.device if generator is not None else device
    return torch.randperm(high, generator=generator, device=gen_device)[:count].to(device)


def kmeans_plus_plus(data: Tensor, k: int, *, generator: torch.Generator | None = None) -> Tensor:
    """k-means++ seeds (Arthur & Vassilvitskii, 2007): `[M, d]` data -> `[k, d]` centroids.

    Each new seed is drawn with probability proportional to its squared distance to the
    nearest seed so far. Needs `M >= k`.
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


def lloyd(data: Tensor, centroids: Tensor, *, iters: int, spherical: bool = False) -> Tensor:
    """`iters` Lloyd iterations from `centroids` `[k, d]` on `data` `[M, d]`.

    An empty cluster keeps its previous centroid. With `spherical=True`, centroids are
    re-normalised to unit length after each mean (spherical k-means, for cosine codebooks).
    """
    k = centroids.shape[0]
    for _ in range(iters):
        codes, _ = nearest_codes(data, centroids)
        sums = data.new_zeros(k, data.shape[1]).index_add_(0, codes, data)
        counts = data.new_zeros(k).index_add_(0, codes, data.new_ones(data.shape[0]))
        means = sums / counts.clamp_min(1).unsqueeze(-1)
        if spherical:
            means = F.normalize(means, dim=-1)
        centroids = torch.where((counts > 0).unsqueeze(-1), means, centroids)
    return centroids


def kmeans(
    data: Tensor,
    k: int,
    *,
    iters: int = 20,
    spherical: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """k-means++ seeding on a subset of at most `16 k` points, then Lloyd on all of `data`.

    Args:
        data: `[M, d]` floating tensor, `M >= k`.
        k: number of centroids.
        iters: Lloyd iterations.
        spherical: normalise data and centroids (cosine k-means).
        generator: source of randomness.

    Returns:
        `[k, d]` centroids in `data`'s dtype.
    """
    if spherical:
        data = F.normalize(data, dim=-1)
    subset = data
    if data.shape[0] > _SEED_POINTS_PER_CODE * k:
        subset = data[
            _sample_indices(_SEED_POINTS_PER_CODE * k, data.shape[0], generator, data.device)
        ]
    seeds = kmeans_plus_plus(subset, k, generator=generator)
    return lloyd(data, seeds, iters=iters, spherical=spherical)
