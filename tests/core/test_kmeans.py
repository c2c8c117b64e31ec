"""k-means in pure torch: k-means++ seeding and Lloyd iterations against brute force."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from vqfunc._kmeans import kmeans, kmeans_plus_plus, lloyd


def objective(data: torch.Tensor, centroids: torch.Tensor) -> float:
    """Sum of squared distances of each point to its nearest centroid, in float64."""
    diff = data.double().unsqueeze(1) - centroids.double().unsqueeze(0)
    return float(diff.square().sum(-1).min(-1).values.sum())


def test_kmeans_plus_plus_picks_distinct_data_points(generator: torch.Generator) -> None:
    data = torch.randn(50, 3, generator=generator)
    seeds = kmeans_plus_plus(data, 10, generator=generator)
    assert seeds.shape == (10, 3)
    matches = (seeds.unsqueeze(1) == data.unsqueeze(0)).all(-1)
    assert torch.all(matches.sum(-1) == 1)  # every seed is one data point
    assert torch.unique(seeds, dim=0).shape[0] == 10


def test_kmeans_plus_plus_covers_separated_clusters(generator: torch.Generator) -> None:
    # Far apart clusters: D^2 sampling puts one seed in each with overwhelming probability.
    centers = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]])
    data = (centers.unsqueeze(1) + torch.randn(4, 25, 2, generator=generator)).reshape(-1, 2)
    seeds = kmeans_plus_plus(data, 4, generator=generator)
    owner = torch.cdist(seeds, centers).argmin(-1)
    assert sorted(owner.tolist()) == [0, 1, 2, 3]


def test_kmeans_plus_plus_with_duplicate_points() -> None:
    data = torch.ones(6, 2)
    seeds = kmeans_plus_plus(data, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(seeds, torch.ones(3, 2))


def test_one_lloyd_step_equals_brute_force(generator: torch.Generator) -> None:
    data = torch.randn(40, 3, generator=generator)
    centroids = torch.randn(5, 3, generator=generator)
    # A centroid far from every point owns no point and must stay where it is.
    centroids[4] = 1000.0
    new = lloyd(data, centroids, iters=1)
    owner = torch.cdist(data.double(), centroids.double()).argmin(-1)
    for k in range(4):
        members = data[owner == k]
        expected = members.mean(0) if len(members) else centroids[k]
        torch.testing.assert_close(new[k], expected)
    assert torch.equal(new[4], centroids[4])


def test_lloyd_never_increases_the_objective(generator: torch.Generator) -> None:
    data = torch.randn(200, 4, generator=generator)
    centroids = data[:8].clone()
    values = [objective(data, centroids)]
    for _ in range(6):
        centroids = lloyd(data, centroids, iters=1)
        values.append(objective(data, centroids))
    for before, after in itertools.pairwise(values):
        assert after <= before + 1e-9
    assert values[-1] < values[0]


def test_lloyd_does_not_mutate_its_arguments(generator: torch.Generator) -> None:
    data = torch.randn(30, 2, generator=generator)
    centroids = torch.randn(4, 2, generator=generator)
    data_before, centroids_before = data.clone(), centroids.clone()
    lloyd(data, centroids, iters=3)
    assert torch.equal(data, data_before) and torch.equal(centroids, centroids_before)


def test_kmeans_recovers_cluster_means(generator: torch.Generator) -> None:
    centers = 20.0 * torch.randn(6, 3, generator=generator)
    data = (centers.unsqueeze(1) + 0.5 * torch.randn(6, 50, 3, generator=generator)).reshape(-1, 3)
    result = kmeans(data, 6, iters=10, generator=generator)
    owner = torch.cdist(result, centers).argmin(-1)
    assert sorted(owner.tolist()) == list(range(6))
    for k in range(6):
        cluster_mean = data.reshape(6, 50, 3)[owner[k]].mean(0)
        torch.testing.assert_close(result[k], cluster_mean)


def test_spherical_kmeans_gives_unit_centroids(generator: torch.Generator) -> None:
    data = torch.randn(100, 4, generator=generator) * 7.0
    result = kmeans(data, 5, iters=50, spherical=True, generator=generator)
    torch.testing.assert_close(result.norm(dim=-1), torch.ones(5))
    # A fixed point of spherical Lloyd: each centroid is the normalised mean of its points.
    unit = F.normalize(data, dim=-1)
    again = lloyd(unit, result, iters=1, spherical=True)
    torch.testing.assert_close(again, result, atol=1e-5, rtol=0)


def test_kmeans_same_seed_same_result() -> None:
    data = torch.randn(300, 3, generator=torch.Generator().manual_seed(0))

    def run(seed: int) -> torch.Tensor:
        return kmeans(data, 8, iters=3, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_kmeans_keeps_the_dtype() -> None:
    data = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert kmeans(data, 4, iters=2).dtype == torch.float64
