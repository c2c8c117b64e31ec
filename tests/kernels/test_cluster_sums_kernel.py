"""The compiled k-means cluster sums (`vqfunc/_kernels/csrc/cluster_sums.c`) against a float64
brute force, bit for bit against `index_add_` / `bincount`, for several thread counts."""

from __future__ import annotations

import pytest
import torch

from vqfunc._kernels import cluster_sums_cpu
from vqfunc._kernels import cpu as _cpu_kernel

pytestmark = pytest.mark.skipif(
    not _cpu_kernel.available(), reason="the compiled CPU kernel does not build here"
)


def _brute_force(x: torch.Tensor, codes: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    sums = torch.stack([x.double()[codes == c].sum(0) for c in range(k)])
    counts = torch.tensor([int((codes == c).sum()) for c in range(k)])
    return sums, counts


@pytest.mark.parametrize(("n", "d", "k"), [(0, 3, 2), (1, 1, 1), (57, 5, 9), (2000, 33, 300)])
@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_cluster_sums_equal_brute_force_and_index_add(n: int, d: int, k: int, threads: int) -> None:
    g = torch.Generator().manual_seed(n + d + k)
    x = torch.randn(n, d, generator=g)
    # Skewed codes, some never used: empty clusters must come back as zero sums and counts.
    codes = (torch.rand(n, generator=g).square() * (k - 1)).long()
    sums, counts = cluster_sums_cpu.cluster_sums(x, codes, k, threads=threads)
    expected_sums, expected_counts = _brute_force(x, codes, k)
    assert sums.dtype == torch.float32 and counts.dtype == torch.int64
    assert torch.equal(counts, expected_counts)
    torch.testing.assert_close(sums.double(), expected_sums, rtol=1e-5, atol=1e-5)
    # The same additions in the same order as torch's serial scatter.
    assert torch.equal(sums, x.new_zeros(k, d).index_add_(0, codes, x))
    assert torch.equal(counts, torch.bincount(codes, minlength=k))


def test_cluster_sums_do_not_depend_on_the_thread_count() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30000, 40, generator=g)
    codes = torch.randint(0, 700, (30000,), generator=g)
    one = cluster_sums_cpu.cluster_sums(x, codes, 700, threads=1)
    for threads in (2, 5, None):
        other = cluster_sums_cpu.cluster_sums(x, codes, 700, threads=threads)
        assert torch.equal(one[0], other[0]) and torch.equal(one[1], other[1])


def test_cluster_sums_read_a_strided_view_as_its_values() -> None:
    x = torch.randn(6, 40)[:, ::4]  # not contiguous
    codes = torch.tensor([0, 1, 0, 2, 1, 0])
    sums, _ = cluster_sums_cpu.cluster_sums(x, codes, 3)
    torch.testing.assert_close(sums, x.new_zeros(3, 10).index_add_(0, codes, x))


@pytest.mark.parametrize("bad", [-1, 4])
def test_cluster_sums_reject_a_code_outside_the_codebook(bad: int) -> None:
    codes = torch.tensor([0, bad, 1])
    with pytest.raises(RuntimeError, match="a code outside the codebook"):
        cluster_sums_cpu.cluster_sums(torch.randn(3, 2), codes, 4)


def test_cluster_sums_reject_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"codes: expected shape \(3,\).*got \(2,\)"):
        cluster_sums_cpu.cluster_sums(torch.randn(3, 2), torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match=r"x: expected a 2-D tensor.*got shape \(3,\)"):
        cluster_sums_cpu.cluster_sums(torch.randn(3), torch.tensor([0, 1, 0]), 2)
    with pytest.raises(ValueError, match=r"k: expected an int >= 1, got 0"):
        cluster_sums_cpu.cluster_sums(torch.randn(3, 2), torch.tensor([0, 0, 0]), 0)


def test_applies_only_to_plain_float32_cpu_tensors() -> None:
    codes = torch.tensor([0, 1])
    assert cluster_sums_cpu.applies(torch.randn(2, 3), codes)
    assert not cluster_sums_cpu.applies(torch.randn(2, 3, dtype=torch.float64), codes)
    assert not cluster_sums_cpu.applies(torch.randn(2, 3), codes.int())
