"""Code statistics against brute-force counts and the textbook formulas."""

from __future__ import annotations

import math

import pytest
import torch

from vqfunc import code_histogram, perplexity, usage


def test_histogram_counts_codes(generator: torch.Generator) -> None:
    codes = torch.randint(0, 7, (5, 11), generator=generator)
    hist = code_histogram(codes, 9)
    expected = [float((codes == k).sum()) for k in range(9)]
    assert hist.tolist() == expected
    assert hist.dtype == torch.float32


def test_histogram_with_weights(generator: torch.Generator) -> None:
    codes = torch.randint(0, 4, (20,), generator=generator)
    mask = torch.rand(20, generator=generator) > 0.5
    weights = torch.rand(20, generator=generator, dtype=torch.float64)
    masked = code_histogram(codes, 4, weights=mask)
    assert masked.tolist() == [float(((codes == k) & mask).sum()) for k in range(4)]
    weighted = code_histogram(codes, 4, weights=weights)
    assert weighted.dtype == torch.float64
    expected = torch.stack([weights[codes == k].sum() for k in range(4)])
    torch.testing.assert_close(weighted, expected)


def test_histogram_of_no_codes() -> None:
    assert code_histogram(torch.zeros(0, dtype=torch.long), 3).tolist() == [0.0, 0.0, 0.0]


def test_histogram_refuses_float_codes() -> None:
    with pytest.raises(TypeError, match=r"codes must be an integer tensor, got torch.float32"):
        code_histogram(torch.zeros(3), 4)


def entropy_exp(counts: list[float]) -> float:
    total = sum(counts)
    if total == 0:
        return 1.0
    return math.exp(-sum(n / total * math.log(n / total) for n in counts if n > 0))


@pytest.mark.parametrize(
    "counts",
    [[5.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [3.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]],
)
def test_perplexity_and_usage_formulas(counts: list[float]) -> None:
    hist = torch.tensor(counts)
    assert math.isclose(float(perplexity(hist)), entropy_exp(counts), rel_tol=1e-6)
    assert float(usage(hist)) == sum(n > 0 for n in counts) / len(counts)


def test_perplexity_extremes() -> None:
    assert float(perplexity(torch.tensor([0.0, 9.0, 0.0]))) == pytest.approx(1.0)
    assert float(perplexity(torch.full((16,), 3.0))) == pytest.approx(16.0)


def test_metrics_work_over_the_last_axis(generator: torch.Generator) -> None:
    hist = torch.randint(0, 5, (3, 6), generator=generator).float()
    per_row = perplexity(hist)
    assert per_row.shape == (3,)
    for row, value in zip(hist.tolist(), per_row.tolist(), strict=True):
        assert math.isclose(value, entropy_exp(row), rel_tol=1e-6)
    torch.testing.assert_close(usage(hist), (hist > 0).float().mean(-1))


def test_integer_histograms_are_accepted() -> None:
    codes = torch.tensor([0, 1, 1, 2, 2, 2])
    counts = torch.bincount(codes, minlength=5)
    assert counts.dtype == torch.int64
    assert math.isclose(float(perplexity(counts)), entropy_exp([1, 2, 3, 0, 0]), rel_tol=1e-6)
    assert float(usage(counts)) == pytest.approx(3 / 5)
    assert perplexity(counts).dtype == usage(counts).dtype == torch.float32
    with pytest.raises(TypeError, match=r"histogram must be a tensor of counts .* got list"):
        perplexity([1, 2, 3])  # type: ignore[arg-type]
