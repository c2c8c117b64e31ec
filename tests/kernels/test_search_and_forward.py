"""The one-pass search and forward (`vq_quantize_f32`, `fused_forward_cpu.search_and_forward`)
against the two passes it replaces, on every ISA path this CPU runs: the search
(`nearest_codes`) and then the compiled pass after it (`fused_forward_cpu.forward`). Codes,
distances, validity, `z`, `out` and `z_q` agree bit for bit; the loss, the histogram and the
perplexity (summed per slice instead of per thread) to rounding. Dimensions reach the full
vectors, the quarter-vector and the scalar tails, and the large-d panel sweep; several row
blocks and slices, two threads, non-finite rows, row weights and non-temporal stores."""

from __future__ import annotations

import math

import pytest
import torch
from support.weights import row_weights

import vqfunc
from vqfunc._kernels import cpu as _cpu_kernel
from vqfunc._kernels import fused_forward_cpu as _fused_cpu
from vqfunc._metrics import perplexity
from vqfunc._search import nearest_codes

pytestmark = pytest.mark.skipif(
    not _cpu_kernel.available(), reason="the compiled CPU kernel does not build here"
)


@pytest.fixture(params=_cpu_kernel.ISA_PATHS)
def isa(request: pytest.FixtureRequest) -> str:
    if not _cpu_kernel.available() or request.param not in _cpu_kernel.isa_paths():
        pytest.skip(f"this CPU does not run {request.param}")
    return str(request.param)


def _case(
    m: int, d: int, k: int, mask: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(m, 1, d, generator=g) + 3.0  # an offset: the search centres the rows
    rows[1, 0, 0] = math.nan
    rows[5, 0, d - 1] = math.inf
    rows[m - 1] = -math.inf
    codebook = torch.randn(k, d, generator=g) + 3.0
    return rows, codebook, row_weights(m, mask, g)


def _two_passes(
    rows: torch.Tensor, codebook: torch.Tensor, mask: torch.Tensor | None
) -> _fused_cpu.FusedRows:
    codes, distances = nearest_codes(rows[:, 0], codebook)
    return _fused_cpu.forward(rows, codebook, codes.view(-1, 1), distances.view(-1, 1), mask)


def _assert_same(got: _fused_cpu.FusedRows, want: _fused_cpu.FusedRows) -> None:
    for name in ("z", "out", "z_q", "codes", "distances", "valid", "num_invalid"):
        a, b = getattr(got, name), getattr(want, name)
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), name
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(got.histogram, want.histogram, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("d", [1, 3, 8, 12, 16, 20, 32, 33, 64, 130])
@pytest.mark.parametrize(("mask", "stream"), [("none", False), ("float", False), ("float", True)])
def test_one_pass_equals_the_search_then_the_pass(
    isa: str, d: int, mask: str, stream: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With `stream`, non-temporal stores wherever d is whole vectors of the path (16, 32, 64).
    monkeypatch.setattr(_fused_cpu, "_STREAM_BYTES", 0 if stream else 1 << 62)
    rows, codebook, weights = _case(601, d, 70, mask, seed=d)
    with vqfunc.kernels.use(cpu="require", cpu_isa=isa):
        got, ppl = _fused_cpu.search_and_forward(rows, codebook, weights)
        want = _two_passes(rows, codebook, weights)
    _assert_same(got, want)
    assert int(got.num_invalid) == 3 and not got.valid[[1, 5, 600]].any()
    assert (got.codes[[1, 5, 600]] == 0).all() and got.distances[[1, 5, 600]].isnan().all()
    torch.testing.assert_close(ppl, perplexity(got.histogram).mean(), rtol=1e-5, atol=0.0)


def test_slices_and_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    # Many slices on two threads: the per-slice sums are added in slice order, so a repeat
    # gives the same bits, and 0/1 weights give exact counts for any thread count.
    monkeypatch.setattr(_cpu_kernel, "_MIN_WORK_PER_THREAD", 1)
    monkeypatch.setattr(_cpu_kernel, "_SLICES_PER_THREAD", 5)
    rows, codebook, weights = _case(5000, 12, 40, "bool", seed=3)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (2, 2, 1):
            torch.set_num_threads(threads)
            results.append(_fused_cpu.search_and_forward(rows, codebook, weights))
        want = _two_passes(rows, codebook, weights)
    finally:
        torch.set_num_threads(previous)
    (first, ppl_first), (again, ppl_again), (one, _) = results
    assert torch.equal(first.loss, again.loss) and torch.equal(ppl_first, ppl_again)
    assert torch.equal(first.histogram, one.histogram)
    _assert_same(first, want)
    _assert_same(one, want)
    valid = torch.isfinite(rows).flatten(1).all(1)
    counts = torch.zeros(40).index_add_(0, want.codes[:, 0], valid.float() * weights)
    assert torch.equal(first.histogram[0], counts)


def test_all_invalid_rows_and_one_row() -> None:
    codebook = torch.randn(9, 4)
    bad, ppl = _fused_cpu.search_and_forward(torch.full((3, 1, 4), math.nan), codebook, None)
    assert int(bad.num_invalid) == 3 and float(bad.loss) == 0.0 and float(ppl) == 1.0
    assert torch.equal(bad.out, codebook[0].expand(3, 1, 4)) and (bad.z == 0).all()
    one, ppl = _fused_cpu.search_and_forward(codebook[4:5].view(1, 1, 4), codebook, None)
    assert int(one.codes) == 4 and float(one.loss) == 0.0 and float(ppl) == 1.0


def test_bad_arguments_are_named() -> None:
    rows, codebook = torch.randn(10, 1, 4), torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"codebook: expected a torch.float32 CPU tensor"):
        _fused_cpu.search_and_forward(rows, codebook.double(), None)
    with pytest.raises(ValueError, match=r"rows: expected a torch.float32 CPU tensor of shape"):
        _fused_cpu.search_and_forward(torch.randn(10, 2, 4), codebook, None)
    with pytest.raises(ValueError, match=r"mask: expected .* shape \(10,\)"):
        _fused_cpu.search_and_forward(rows, codebook, torch.ones(9))
    with pytest.raises(ValueError, match=r"expected at least one row"):
        _fused_cpu.search_and_forward(rows[:0], codebook, None)
    with pytest.raises(ValueError, match=r"rows, codebook: expected shapes \(M, 1, d\)"):
        _fused_cpu.search_and_forward(rows[:, 0], codebook, None)
