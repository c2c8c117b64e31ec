"""The search on degenerate data: every backend picks the same, exact codes.

- Codes with a non-finite entry are never chosen; with no finite code at all, every row gets 0.
- Vectors and codes sharing a large offset (up to 1e4 times their spread) get the float64
  nearest code, ties at float32 rounding of the true distances aside.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.reference import brute_force

from vqfunc._kernels import cpu as _cpu_kernel
from vqfunc._search import nearest_codes, torch_nearest_codes

needs_kernel = pytest.mark.skipif(
    not _cpu_kernel.available(), reason="the compiled CPU kernel does not build here"
)


def _backends(vectors: torch.Tensor, codebook: torch.Tensor) -> dict[str, torch.Tensor]:
    codes = {"torch": torch_nearest_codes(vectors, codebook)}
    if _cpu_kernel.available():
        codes["kernel"] = _cpu_kernel.nearest_codes_f32(vectors, codebook)[0]
    return codes


def _assert_exact_ties_aside(vectors: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor):
    """`codes` are the float64 nearest codes but where the best two are within float32 rounding
    of the true squared distances (of the offset-free problem's size)."""
    sq = brute_force(vectors, codebook)  # float64, from differences: exact for the offset data
    best = sq.min(1).values
    chosen = sq.gather(1, codes.view(-1, 1)).squeeze(1)
    # float32 rounding of squared distances of size `best` (the spread, not the offset).
    tolerance = 1e-5 * (best + sq.mean(1)) + 1e-30
    assert torch.all(chosen - best <= tolerance), (chosen - best).max()


@given(
    n=st.integers(1, 60),
    k=st.integers(1, 140),
    d=st.sampled_from([1, 3, 8, 16, 33, 64, 130]),
    offset_exp=st.integers(0, 4),
    seed=st.integers(0, 2**31 - 1),
)
@settings(max_examples=40, deadline=None)
def test_codes_are_exact_under_a_common_offset(
    n: int, k: int, d: int, offset_exp: int, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    spread = 1.0
    offset = (10.0**offset_exp) * spread * torch.randn(d, generator=g).sign()
    vectors = spread * torch.randn(n, d, generator=g) + offset
    codebook = spread * torch.randn(k, d, generator=g) + offset
    for name, codes in _backends(vectors, codebook).items():
        try:
            _assert_exact_ties_aside(vectors, codebook, codes)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None


def test_offset_of_a_thousand_no_longer_misses_a_third_of_the_codes() -> None:
    """The reproducer: spread 1, offset 1000 (33% of codes were not the nearest before)."""
    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(2000, 16, generator=g) + 1000.0
    codebook = torch.randn(256, 16, generator=g) + 1000.0
    exact = brute_force(vectors, codebook).argmin(1)
    for name, codes in _backends(vectors, codebook).items():
        assert (codes != exact).float().mean() <= 0.002, name


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_codes_are_never_chosen_and_backends_agree(bad: float) -> None:
    g = torch.Generator().manual_seed(1)
    vectors = torch.randn(6, 4, generator=g)
    codebook = torch.randn(8, 4, generator=g)
    codebook[3, 1] = bad  # the reproducer's NaN code
    codebook[0] = bad
    results = _backends(vectors, codebook)
    finite = torch.isfinite(codebook).all(-1)
    sq = brute_force(vectors, codebook[finite])
    expected = finite.nonzero().squeeze(1)[sq.argmin(1)]
    for name, codes in results.items():
        assert torch.equal(codes, expected), (name, codes, expected)


def test_no_finite_code_gives_code_zero_everywhere() -> None:
    vectors = torch.randn(5, 3)
    codebook = torch.full((4, 3), float("nan"))
    for name, codes in _backends(vectors, codebook).items():
        assert torch.equal(codes, torch.zeros(5, dtype=torch.int64)), name


def test_nan_rows_get_code_zero_everywhere() -> None:
    vectors = torch.randn(7, 5)
    vectors[2] = float("nan")
    vectors[4, 0] = float("nan")
    codebook = torch.randn(9, 5)
    for name, codes in _backends(vectors, codebook).items():
        assert codes[2] == 0 and codes[4] == 0, name


@needs_kernel
def test_the_dispatcher_reports_exact_distances_under_an_offset() -> None:
    g = torch.Generator().manual_seed(2)
    vectors = torch.randn(300, 8, generator=g) + 5000.0
    codebook = torch.randn(40, 8, generator=g) + 5000.0
    codes, distances = nearest_codes(vectors, codebook)
    expected = (vectors.double() - codebook.double()[codes]).norm(dim=-1)
    # The distance of the uncentred vectors, rounded in float32 (absolute error ~ eps * offset).
    torch.testing.assert_close(distances.double(), expected, rtol=0, atol=5e-3)
