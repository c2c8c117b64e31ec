"""`warmup_params`: codebooks fitted to data, purely."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vqfunc
from vqfunc import VQConfig
from vqfunc._affine import effective_codebook


def clustered(
    num_clusters: int, per_cluster: int, dim: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[num_clusters * per_cluster, dim]` points in tight, well separated clusters."""
    centers = 10.0 * torch.randn(num_clusters, dim, generator=generator)
    noise = 0.1 * torch.randn(num_clusters, per_cluster, dim, generator=generator)
    return (centers.unsqueeze(1) + noise).reshape(-1, dim), centers


def cdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact pairwise distances (torch.cdist's matmul shortcut loses digits near 0)."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def quantization_error(params: vqfunc.VQParams, x: torch.Tensor, cfg: VQConfig) -> float:
    """Mean squared distance of each row of `x` to its nearest code, by brute force."""
    codes = effective_codebook(params, cfg).to(torch.float64)
    return float(cdist(x.to(torch.float64), codes).min(-1).values.square().mean())


def rows_in(rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """For each row of `rows`, whether it equals some row of `table` exactly."""
    return (rows.unsqueeze(1) == table.unsqueeze(0)).all(-1).any(-1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_beats_data_on_clustered_data(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, _ = clustered(16, 40, 6, g)
    cfg = VQConfig(feature_size=6, num_codes=16, dim=-1)
    params = vqfunc.init_params(cfg, generator=g)
    by_data = vqfunc.warmup_params(params, x, cfg, method="data", generator=g)
    by_kmeans = vqfunc.warmup_params(params, x, cfg, method="kmeans", generator=g)
    error_data = quantization_error(by_data, x, cfg)
    error_kmeans = quantization_error(by_kmeans, x, cfg)
    assert error_kmeans < error_data
    # k-means finds every cluster: the error is the clusters' own spread (0.1^2 per axis).
    assert error_kmeans < 2 * 6 * 0.1**2


def test_data_draws_distinct_input_rows(generator: torch.Generator) -> None:
    cfg = VQConfig(feature_size=5, num_codes=20, dim=-1)
    x = torch.randn(50, 5, generator=generator)
    params = vqfunc.init_params(cfg, generator=generator)
    warmed = vqfunc.warmup_params(params, x, cfg, method="data", generator=generator)
    codebook = warmed.codebook
    assert rows_in(codebook, x).all()
    assert torch.unique(codebook, dim=0).shape[0] == cfg.num_codes


def test_data_draws_uniformly_from_all_rows() -> None:
    # Not only the first `num_codes` rows: over many seeds, every row gets drawn.
    cfg = VQConfig(feature_size=1, num_codes=4, dim=-1)
    x = torch.arange(40.0).unsqueeze(-1)
    params = vqfunc.init_params(cfg)
    drawn = torch.zeros(40, dtype=torch.bool)
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        codes = vqfunc.warmup_params(params, x, cfg, generator=g).codebook.squeeze(-1)
        drawn[codes.long()] = True
    assert drawn.all()


def test_data_with_fewer_vectors_than_codes(generator: torch.Generator) -> None:
    cfg = VQConfig(feature_size=4, num_codes=12, dim=-1)
    x = torch.randn(5, 4, generator=generator)
    params = vqfunc.init_params(cfg, generator=generator)
    codebook = vqfunc.warmup_params(params, x, cfg, method="data", generator=generator).codebook
    exact = rows_in(codebook, x)
    assert int(exact.sum()) == 5
    assert rows_in(x, codebook).all()  # every input row is used once
    # The other codes are noisy copies of input rows: close to one, equal to none.
    extra = codebook[~exact]
    nearest = cdist(extra, x).min(-1).values
    rms = float(x.square().mean().sqrt())
    assert torch.all(nearest > 0)
    assert torch.all(nearest < 0.1 * rms)
    assert torch.unique(codebook, dim=0).shape[0] == cfg.num_codes


@pytest.mark.parametrize("method", ["data", "kmeans"])
def test_kmeans_with_fewer_vectors_than_codes_falls_back_to_data(method: str) -> None:
    cfg = VQConfig(feature_size=3, num_codes=8, dim=-1)
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(3))
    params = vqfunc.init_params(cfg)
    warmed = vqfunc.warmup_params(params, x, cfg, method=method)  # type: ignore[arg-type]
    assert rows_in(x, warmed.codebook).all()
    assert torch.isfinite(warmed.codebook).all()


@pytest.mark.parametrize("method", ["data", "kmeans"])
def test_same_seed_same_result(method: str) -> None:
    cfg = VQConfig(feature_size=4, num_codes=8, dim=1, groups=2, share=False)
    x = torch.randn(6, 4, 10, generator=torch.Generator().manual_seed(0))
    params = vqfunc.init_params(cfg, generator=torch.Generator().manual_seed(1))

    def run(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return vqfunc.warmup_params(params, x, cfg, method=method, generator=g).codebook  # type: ignore[arg-type]

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


@pytest.mark.parametrize("method", ["data", "kmeans"])
def test_params_are_not_mutated(method: str, generator: torch.Generator) -> None:
    cfg = VQConfig(feature_size=4, num_codes=8, dim=-1, affine_lr=1.0)
    params = vqfunc.init_params(cfg, generator=generator)
    params = params._replace(affine_scale=torch.full((1, 4), 0.5))
    before = [t.clone() for t in params]
    x = torch.randn(40, 4, generator=generator)
    x_before = x.clone()
    warmed = vqfunc.warmup_params(params, x, cfg, method=method, generator=generator)  # type: ignore[arg-type]
    for old, now in zip(before, params, strict=True):
        assert torch.equal(old, now)
    assert torch.equal(x, x_before)
    assert warmed.codebook is not params.codebook
    assert not torch.equal(warmed.codebook, params.codebook)
    assert warmed.codebook.shape == params.codebook.shape
    assert warmed.codebook.dtype == params.codebook.dtype


def test_cosine_kmeans_finds_directions(generator: torch.Generator) -> None:
    # Clusters of directions, each point with its own (very different) norm.
    directions = F.normalize(torch.randn(6, 5, generator=generator), dim=-1)
    noise = 0.02 * torch.randn(6, 30, 5, generator=generator)
    norms = torch.exp(2.0 * torch.randn(6, 30, 1, generator=generator))
    x = ((directions.unsqueeze(1) + noise) * norms).reshape(-1, 5)
    cfg = VQConfig(feature_size=5, num_codes=6, dim=-1, dist="cosine")
    params = vqfunc.init_params(cfg, generator=generator)
    warmed = vqfunc.warmup_params(params, x, cfg, method="kmeans", generator=generator)
    codes = warmed.codebook
    torch.testing.assert_close(codes.norm(dim=-1), torch.ones(6))
    # Every true direction has a code within a small angle.
    cosines = directions @ codes.t()
    assert torch.all(cosines.max(-1).values > 0.99)
    # And quantizing with the warmed codebook gets each cluster its own code.
    _, out = vqfunc.quantize(warmed, x, cfg)
    per_cluster = out.codes.reshape(6, 30)
    assert torch.all(per_cluster == per_cluster[:, :1])
    assert per_cluster[:, 0].unique().numel() == 6


@pytest.mark.parametrize("method", ["data", "kmeans"])
def test_affine_warmup_makes_the_effective_codes_fit(method: str) -> None:
    g = torch.Generator().manual_seed(4)
    cfg = VQConfig(feature_size=4, num_codes=8, dim=-1, affine_lr=2.0, affine_groups=2)
    params = vqfunc.init_params(cfg, generator=g)
    params = params._replace(
        affine_scale=0.3 * torch.randn(2, 4, generator=g),
        affine_bias=torch.randn(2, 4, generator=g),
    )
    x, centers = clustered(8, 20, 4, g)
    warmed = vqfunc.warmup_params(params, x, cfg, method=method, generator=g)  # type: ignore[arg-type]
    assert torch.equal(warmed.affine_scale, params.affine_scale)
    assert torch.equal(warmed.affine_bias, params.affine_bias)
    effective = effective_codebook(warmed, cfg)
    if method == "data":
        # The effective codes are input rows (up to the affine map's rounding).
        nearest = cdist(effective, x).min(-1).values
        assert torch.all(nearest < 1e-4)
    else:
        nearest = cdist(centers, effective).min(-1).values
        assert torch.all(nearest < 0.2)


def test_separate_codebooks_are_fitted_per_group(generator: torch.Generator) -> None:
    cfg = VQConfig(feature_size=6, num_codes=12, dim=-1, groups=3, share=False)
    # Each group's sub-vectors live in its own range, so a code drawn from the wrong group shows.
    x = torch.randn(30, 3, 2, generator=generator) + 100.0 * torch.arange(3.0).view(1, 3, 1)
    params = vqfunc.init_params(cfg, generator=generator)
    warmed = vqfunc.warmup_params(params, x.reshape(30, 6), cfg, generator=generator)
    assert warmed.codebook.shape == (3, 4, 2)
    for group in range(3):
        assert rows_in(warmed.codebook[group], x[:, group]).all()


def test_shared_codebook_draws_from_all_groups(generator: torch.Generator) -> None:
    cfg = VQConfig(feature_size=4, num_codes=6, dim=1, groups=2)
    x = torch.randn(3, 4, 5, generator=generator)
    params = vqfunc.init_params(cfg, generator=generator)
    warmed = vqfunc.warmup_params(params, x, cfg, generator=generator)
    sub_vectors = x.movedim(1, -1).reshape(-1, 2)
    assert rows_in(warmed.codebook, sub_vectors).all()


@pytest.mark.parametrize(
    ("x_dtype", "params_dtype"),
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float64),
    ],
)
def test_dtypes(x_dtype: torch.dtype, params_dtype: torch.dtype) -> None:
    cfg = VQConfig(feature_size=4, num_codes=8, dim=-1)
    g = torch.Generator().manual_seed(0)
    params = vqfunc.init_params(cfg, generator=g, dtype=params_dtype)
    x = torch.randn(30, 4, generator=g).to(x_dtype)
    for method in ("data", "kmeans"):
        warmed = vqfunc.warmup_params(params, x, cfg, method=method, generator=g)  # type: ignore[arg-type]
        assert warmed.codebook.dtype == params_dtype
        assert torch.isfinite(warmed.codebook).all()
    warmed = vqfunc.warmup_params(params, x, cfg, method="data", generator=g)
    assert rows_in(warmed.codebook, x.to(params_dtype)).all()
