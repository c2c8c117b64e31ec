"""k-means in pure torch: k-means||, k-means++ and Lloyd iterations against brute force."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from vqfunc._kmeans import (
    _cluster_stats,
    _lloyd,
    kmeans,
    kmeans_parallel_candidates,
    kmeans_plus_plus,
    lloyd,
    oversampling_probabilities,
    weighted_plus_plus,
)


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


# --- k-means|| seeding, against float64 brute force -------------------------------------------


def brute_squared_distances(points: torch.Tensor, centers: torch.Tensor) -> list[float]:
    """Squared distance of each point to its nearest center, by explicit loops in float64."""
    out = []
    for p in points.double().tolist():
        out.append(
            min(
                sum((a - b) ** 2 for a, b in zip(p, c, strict=True))
                for c in centers.double().tolist()
            )
        )
    return out


def test_oversampling_probabilities_equal_the_formula() -> None:
    closest = torch.tensor([0.0, 1.0, 4.0, 0.25, 9.0])
    for factor in (0.5, 2.0, 100.0):
        got = oversampling_probabilities(closest, factor)
        total = sum(closest.double().tolist())
        expected = [min(1.0, factor * v / total) for v in closest.double().tolist()]
        torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64))
    assert torch.equal(oversampling_probabilities(torch.zeros(3), 2.0), torch.zeros(3))


@pytest.mark.slow
def test_first_round_draws_each_point_with_its_oversampling_probability() -> None:
    # One round after the uniformly drawn first point: point i joins with min(1, l d_i^2 / phi).
    data = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 1.0], [-1.0, -1.0], [2.0, 2.0]])
    k, factor = 2, 1.5  # per round: oversampling * k / rounds = 3
    observed = torch.zeros(6, dtype=torch.float64)
    expected = torch.zeros(6, dtype=torch.float64)
    trials = 1500
    for seed in range(trials):
        candidates, weights = kmeans_parallel_candidates(
            data, k, rounds=1, oversampling=factor, generator=torch.Generator().manual_seed(seed)
        )
        first = int((data == candidates[0]).all(-1).nonzero()[0])
        d2 = brute_squared_distances(data, data[first : first + 1])
        total = sum(d2)
        expected += torch.tensor([min(1.0, factor * k * v / total) for v in d2])
        drawn = (data.unsqueeze(0) == candidates[1:].unsqueeze(1)).all(-1).any(0)
        observed += drawn.double()
        # Weights: the number of points whose nearest candidate (first on ties) it is.
        owner = torch.cdist(data.double(), candidates.double()).argmin(-1)
        assert torch.equal(weights, torch.bincount(owner, minlength=len(candidates)).float())
    # Binomial standard error of each count is at most sqrt(trials / 4) ~ 19.
    assert torch.all((observed - expected).abs() < 80), (observed, expected)


@pytest.mark.slow
def test_weighted_plus_plus_second_draw_follows_weight_times_squared_distance() -> None:
    points = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    weights = torch.tensor([1.0, 3.0, 2.0, 1.0])
    first_counts = torch.zeros(4, dtype=torch.float64)
    pair_counts = torch.zeros(4, 4, dtype=torch.float64)
    trials = 3000
    for seed in range(trials):
        pick = weighted_plus_plus(
            points, weights, 2, batches=2, generator=torch.Generator().manual_seed(seed)
        )
        assert pick[0] != pick[1]
        first_counts[pick[0]] += 1
        pair_counts[pick[0], pick[1]] += 1
    # First draw: proportional to the weights.
    expected_first = trials * weights.double() / weights.sum()
    assert torch.all((first_counts - expected_first).abs() < 100)
    # Second draw given the first: proportional to weight * squared distance to the first.
    for a in range(4):
        d2 = torch.tensor(brute_squared_distances(points, points[a : a + 1]), dtype=torch.float64)
        chance = weights.double() * d2
        expected = first_counts[a] * chance / chance.sum()
        assert torch.all((pair_counts[a] - expected).abs() < 5 * expected.clamp_min(1).sqrt() + 5)


def test_weighted_plus_plus_draws_distinct_rows_even_on_duplicates() -> None:
    points = torch.zeros(10, 3)
    pick = weighted_plus_plus(
        points, torch.ones(10), 7, batches=3, generator=torch.Generator().manual_seed(0)
    )
    assert len(set(pick.tolist())) == 7


def test_weighted_lloyd_step_equals_brute_force(generator: torch.Generator) -> None:
    data = torch.randn(30, 3, generator=generator)
    weights = torch.rand(30, generator=generator) * 5
    centroids = torch.randn(4, 3, generator=generator)
    new = _lloyd(data, centroids, iters=1, spherical=False, weights=weights)
    owner = torch.cdist(data.double(), centroids.double()).argmin(-1)
    for k in range(4):
        w = weights.double()[owner == k]
        if len(w):
            expected = (data.double()[owner == k] * w.unsqueeze(-1)).sum(0) / w.sum()
            torch.testing.assert_close(new[k].double(), expected, rtol=1e-5, atol=1e-6)


def test_cluster_stats_are_the_same_bits_with_and_without_the_compiled_kernel() -> None:
    import vqfunc

    g = torch.Generator().manual_seed(0)
    data = torch.randn(5000, 7, generator=g)
    codes = torch.randint(0, 90, (5000,), generator=g)
    codes[codes == 3] = 4  # an empty cluster
    compiled = _cluster_stats(data, codes, 90, None)
    with vqfunc.kernels.use(cpu="torch"):
        reference = _cluster_stats(data, codes, 90, None)
    assert torch.equal(compiled[0], reference[0]) and torch.equal(compiled[1], reference[1])
    assert compiled[1][3] == 0 and torch.equal(compiled[0][3], torch.zeros(7))
    expected = torch.stack([data.double()[codes == c].sum(0) for c in range(90)])
    torch.testing.assert_close(compiled[0].double(), expected, rtol=1e-5, atol=1e-5)


def test_an_emptied_cluster_is_split_from_a_populated_one(generator: torch.Generator) -> None:
    data = torch.randn(60, 2, generator=generator)
    centroids = torch.cat([data[:3], torch.full((1, 2), 50.0)])
    new = _lloyd(data, centroids, iters=1, spherical=False, generator=generator, split=True)
    assert torch.isfinite(new).all()
    assert new[3].abs().max() < 10  # moved next to the data
    owner = torch.cdist(data.double(), centroids[:3].double()).argmin(-1)
    means = torch.stack([data[owner == k].mean(0) for k in range(3)])
    torch.testing.assert_close(new[:3], means)
    gap = (new[3] - means).norm(dim=-1).min()
    assert 0 < gap < 1e-2  # a perturbed copy of one of the means


@pytest.mark.parametrize(("split", "spherical"), [(False, False), (True, False), (True, True)])
def test_lloyd_stops_at_a_fixed_point_with_the_result_of_every_iteration(
    split: bool, spherical: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vqfunc._kmeans as module

    data = torch.randn(400, 3, generator=torch.Generator().manual_seed(1))
    if spherical:
        data = F.normalize(data, dim=-1)
    start = data[:12].clone()
    iters = 60
    reference = start
    g = torch.Generator().manual_seed(5)
    for _ in range(iters):  # one iteration per call: no fixed point can be detected
        reference = _lloyd(data, reference, iters=1, spherical=spherical, generator=g, split=split)
    # The reference has converged, so the early exit has something to find.
    again = _lloyd(data, reference, iters=1, spherical=spherical, generator=g, split=split)
    assert torch.equal(again, reference)
    searches = []
    original = module.nearest_codes

    def counted(vectors: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, ...]:
        searches.append(1)
        return original(vectors, codebook)

    monkeypatch.setattr(module, "nearest_codes", counted)
    g = torch.Generator().manual_seed(5)
    ours = _lloyd(data, start, iters=iters, spherical=spherical, generator=g, split=split)
    assert torch.equal(ours, reference)  # bit for bit the result of all the iterations
    assert len(searches) < iters  # and it stopped before running them all


def test_kmeans_is_deterministic_for_a_generator_seed() -> None:
    data = torch.randn(3000, 8, generator=torch.Generator().manual_seed(0))

    def run(seed: int) -> torch.Tensor:
        return kmeans(data, 200, iters=4, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(3), run(3))  # bit-identical, with several reduction batches
    assert not torch.equal(run(3), run(4))


def test_kmeans_on_duplicate_points_covers_every_distinct_point() -> None:
    distinct = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    data = distinct.repeat(20, 1)
    result = kmeans(data, 5, iters=5, generator=torch.Generator().manual_seed(0))
    assert result.shape == (5, 2) and torch.isfinite(result).all()
    assert objective(data, result) < 1e-6


def test_kmeans_rejects_more_centroids_than_points() -> None:
    with pytest.raises(ValueError, match=r"kmeans: k must be an int in \[1, M\].*M = 3.*got 4"):
        kmeans(torch.randn(3, 2), 4)


def test_kmeans_parallel_matches_kmeans_plus_plus_on_a_mixture() -> None:
    # 16 well separated clusters: the right answer is the cluster means (error = noise 6 * 0.1^2).
    ours, reference = [], []
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        centers = 10.0 * torch.randn(16, 6, generator=g)
        data = (centers.unsqueeze(1) + 0.1 * torch.randn(16, 40, 6, generator=g)).reshape(-1, 6)
        ours.append(objective(data, kmeans(data, 16, iters=10, generator=g)) / len(data))
        seeds = kmeans_plus_plus(data, 16, generator=g)
        reference.append(objective(data, lloyd(data, seeds, iters=10)) / len(data))
    noise = 6 * 0.1**2
    assert sum(ours) / len(ours) <= 1.2 * sum(reference) / len(reference) + 0.1 * noise
    assert sorted(ours)[len(ours) // 2] < 1.2 * noise  # the median run finds every cluster
