"""Nearest-code search: both implementations against float64 brute force and each other."""

from __future__ import annotations

import multiprocessing
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.reference import assert_nearest, brute_force

import vqfunc
from vqfunc._kernels import cpu as _cpu_kernel
from vqfunc._kernels import policy as _policy
from vqfunc._search import nearest_codes, torch_nearest_codes, uses_cpu_kernel
from vqfunc.bench import PeakMemory

needs_kernel = pytest.mark.skipif(
    not _cpu_kernel.available(), reason="the compiled CPU kernel does not build here"
)


@st.composite
def problems(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    n = draw(st.integers(1, 40))
    d = draw(st.sampled_from([1, 3, 4, 7, 8, 16, 32, 33, 64, 70]))
    k = draw(st.integers(1, 150))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)


@given(problems())
@settings(max_examples=40, deadline=None)
def test_codes_are_nearest_and_distances_exact(problem: tuple[torch.Tensor, torch.Tensor]) -> None:
    vectors, codebook = problem
    codes, distances = nearest_codes(vectors, codebook)
    assert codes.dtype == torch.int64 and codes.shape == (vectors.shape[0],)
    assert_nearest(vectors, codebook, codes)
    expected = brute_force(vectors, codebook).gather(1, codes.view(-1, 1)).squeeze(1).sqrt()
    torch.testing.assert_close(distances.double(), expected, rtol=1e-5, atol=1e-5)


@needs_kernel
@given(problems())
@settings(max_examples=40, deadline=None)
def test_kernel_matches_torch_path(problem: tuple[torch.Tensor, torch.Tensor]) -> None:
    vectors, codebook = problem
    assert uses_cpu_kernel(vectors, codebook)
    kernel, _ = _cpu_kernel.nearest_codes_f32(vectors, codebook)
    reference = torch_nearest_codes(vectors, codebook)
    # Both are exact up to float32 rounding: they may differ only on near-ties.
    sq = brute_force(vectors, codebook)
    differ = kernel != reference
    gap = (sq.gather(1, kernel.view(-1, 1)) - sq.gather(1, reference.view(-1, 1))).abs()
    assert torch.all(gap.squeeze(1)[differ] <= 1e-4)
    assert differ.float().mean() <= 0.05


@needs_kernel
@pytest.mark.parametrize(("n", "d", "k"), [(1000, 8, 1000), (517, 64, 4100), (130, 256, 300)])
def test_kernel_on_larger_shapes_and_threads(n: int, d: int, k: int) -> None:
    g = torch.Generator().manual_seed(n + d + k)
    vectors, codebook = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_cpu_kernel.nearest_codes_f32(vectors, codebook)[0])
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(results[0], results[1])
    assert_nearest(vectors, codebook, results[0])
    assert (results[0] == brute_force(vectors, codebook).argmin(1)).float().mean() > 0.99


@pytest.mark.parametrize("kernel", [True, False])
def test_ties_pick_the_first_code(kernel: bool) -> None:
    if kernel and not _cpu_kernel.available():
        pytest.skip("the compiled CPU kernel does not build here")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(70, 8, generator=g)
    # Code j + 70 repeats code j, and the vectors sit exactly on the repeated codes.
    picks = torch.randperm(70, generator=g)[:33]
    with vqfunc.kernels.use(cpu="compiled" if kernel else "torch"):
        assert uses_cpu_kernel(base, base) == kernel
        codes, distances = nearest_codes(base[picks], torch.cat([base, base]))
    assert torch.equal(codes, picks)
    assert torch.all(distances == 0)


def test_torch_fallback_gives_the_same_codes() -> None:
    g = torch.Generator().manual_seed(1)
    vectors, codebook = torch.randn(300, 16, generator=g), torch.randn(200, 16, generator=g)
    first, _ = nearest_codes(vectors, codebook)
    with vqfunc.kernels.use(cpu="torch"):
        assert not uses_cpu_kernel(vectors, codebook)
        second, _ = nearest_codes(vectors, codebook)
    assert torch.equal(first, second)


def test_failed_build_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    # No compiler anywhere: $CC names none, and PATH holds an empty directory.
    monkeypatch.setenv("CC", "/nonexistent/compiler")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("VQFUNC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("VQFUNC_PREBUILT", "0")
    _cpu_kernel.reset()
    _policy.reset()
    try:
        assert not _cpu_kernel.available()
        assert "no C compiler" in _cpu_kernel.failure()
        g = torch.Generator().manual_seed(2)
        vectors, codebook = torch.randn(50, 8, generator=g), torch.randn(40, 8, generator=g)
        with pytest.warns(RuntimeWarning, match="no C compiler"):
            codes, _ = nearest_codes(vectors, codebook)
        assert_nearest(vectors, codebook, codes)
    finally:
        _cpu_kernel.reset()
        _policy.reset()


@pytest.mark.slow
@needs_kernel
def test_compiler_without_openmp_builds_single_threaded_kernels(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    # A compiler that rejects -fopenmp, as one built without OpenMP support does.
    compiler = Path(str(tmp_path)) / "cc-without-openmp"
    real = shutil.which("cc") or shutil.which("gcc") or "cc"
    compiler.write_text(
        f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec {real} "$@"\n'
    )
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setenv("VQFUNC_PREBUILT", "0")
    monkeypatch.setenv("VQFUNC_CACHE_DIR", str(tmp_path))
    _cpu_kernel.reset()
    try:
        assert _cpu_kernel.available()
        assert "single-threaded" in _cpu_kernel.location()
        g = torch.Generator().manual_seed(3)
        vectors, codebook = torch.randn(600, 16, generator=g), torch.randn(90, 16, generator=g)
        codes, _ = _cpu_kernel.nearest_codes_f32(vectors, codebook)
        assert_nearest(vectors, codebook, codes)
    finally:
        _cpu_kernel.reset()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    vectors = torch.randn(64, 8, generator=g).to(dtype)
    codebook = torch.randn(100, 8, generator=g).to(dtype)
    codes, distances = nearest_codes(vectors, codebook)
    assert distances.dtype == torch.promote_types(dtype, torch.float32)
    assert_nearest(vectors, codebook, codes)


def test_empty_batch_and_single_code() -> None:
    codes, distances = nearest_codes(torch.zeros(0, 5), torch.randn(3, 5))
    assert codes.shape == (0,) and distances.shape == (0,)
    codes, _ = nearest_codes(torch.randn(9, 5), torch.randn(1, 5))
    assert torch.equal(codes, torch.zeros(9, dtype=torch.int64))


def test_non_finite_rows_still_give_valid_codes() -> None:
    vectors = torch.randn(10, 8)
    vectors[3] = float("nan")
    codebook = torch.randn(20, 8)
    codes, _ = nearest_codes(vectors, codebook)
    assert codes.min() >= 0 and codes.max() < 20
    finite = torch.arange(10) != 3
    assert_nearest(vectors[finite], codebook, codes[finite])


def test_vmap_shared_and_stacked_codebooks_equal_a_loop() -> None:
    g = torch.Generator().manual_seed(4)
    vectors = torch.randn(3, 50, 8, generator=g)
    books = torch.randn(3, 70, 8, generator=g)
    shared = torch.func.vmap(nearest_codes, in_dims=(0, None))(vectors, books[0])
    stacked = torch.func.vmap(nearest_codes, in_dims=(0, 0))(vectors, books)
    one_input = torch.func.vmap(nearest_codes, in_dims=(None, 0))(vectors[0], books)
    # The batch axis in the middle, as quantize's groups are.
    middle = torch.func.vmap(nearest_codes, in_dims=(1, None))(vectors.transpose(0, 1), books[0])
    for i in range(3):
        assert torch.equal(shared[0][i], nearest_codes(vectors[i], books[0])[0])
        assert torch.equal(stacked[0][i], nearest_codes(vectors[i], books[i])[0])
        assert torch.equal(one_input[0][i], nearest_codes(vectors[0], books[i])[0])
        assert torch.equal(middle[0][i], shared[0][i])
        torch.testing.assert_close(stacked[1][i], nearest_codes(vectors[i], books[i])[1])


def test_nested_vmap() -> None:
    g = torch.Generator().manual_seed(5)
    vectors = torch.randn(2, 3, 20, 4, generator=g)
    books = torch.randn(2, 30, 4, generator=g)
    inner = torch.func.vmap(nearest_codes, in_dims=(0, None))
    codes, _ = torch.func.vmap(inner, in_dims=(0, 0))(vectors, books)
    for a in range(2):
        for b in range(3):
            assert torch.equal(codes[a, b], nearest_codes(vectors[a, b], books[a])[0])


@pytest.mark.slow
def test_compile_fullgraph_without_recompiles() -> None:
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(nearest_codes, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(6)
    codebook = torch.randn(40, 8, generator=g)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            vectors = torch.randn(25, 8, generator=g)
            codes, _ = compiled(vectors, codebook)
            assert torch.equal(codes, nearest_codes(vectors, codebook)[0])


@needs_kernel
def test_codebook_packing_layout() -> None:
    codebook = torch.randn(70, 5, generator=torch.Generator().manual_seed(7))
    panels, half_norms = _cpu_kernel.pack_codebook(codebook)
    padded = torch.zeros(128, 5)
    padded[:70] = codebook
    # panels[p, j, l] is dimension j of code 16 p + l.
    assert torch.equal(panels, padded.view(8, 16, 5).transpose(1, 2))
    torch.testing.assert_close(half_norms[:70], 0.5 * codebook.square().sum(-1))
    assert torch.isinf(half_norms[70:]).all()


@needs_kernel
@pytest.mark.parametrize(("k", "d"), [(70, 5), (16, 33), (200, 64)])
def test_packing_drops_codes_that_are_not_finite_or_whose_norm_overflows(k: int, d: int) -> None:
    g = torch.Generator().manual_seed(k + d)
    codebook = torch.randn(k, d, generator=g) * 4.0
    codebook[3, d - 1], codebook[k - 1, 0], codebook[8, d // 2] = torch.nan, torch.inf, -torch.inf
    codebook[11] = 2e19  # finite entries whose squares sum past the float32 range
    panels, half_norms = _cpu_kernel.pack_codebook(codebook)
    padded = panels.shape[0] * 16
    # The reference, code by code in float64: a code is kept when its entries and its squared
    # norm are finite in float32; a dropped one (and padding) packs zeros and half norm +inf.
    sq = codebook.double().square().sum(-1)
    kept = torch.isfinite(codebook).all(-1) & (sq < torch.finfo(torch.float32).max)
    assert kept.sum() == k - 4
    want = torch.zeros(padded, d)
    want[:k][kept] = codebook[kept]
    assert torch.equal(panels, want.view(-1, 16, d).transpose(1, 2))
    assert torch.isinf(half_norms[:k][~kept]).all() and torch.isinf(half_norms[k:]).all()
    torch.testing.assert_close(half_norms[:k][kept].double(), 0.5 * sq[kept], rtol=1e-6, atol=0)


@needs_kernel
@pytest.mark.parametrize(
    ("k", "d", "padded"),
    [
        *((1, 4, 64), (64, 16, 64), (65, 16, 128), (4095, 8, 4096), (4097, 8, 4224)),
        *((70, 17, 128), (129, 32, 256), (70, 64, 128), (70, 128, 128)),
    ],
)
def test_codebook_padding_holds_whole_groups_and_the_kernel_checks_it(
    k: int, d: int, padded: int
) -> None:
    # Groups of 4 panels (64 codes); 8 panels for 16 < d < 64, and for d <= 16 from 4096 codes
    # on, where the group's bookkeeping is worth amortising over more codes.
    codebook = torch.randn(k, d, generator=torch.Generator().manual_seed(k))
    panels, half_norms = _cpu_kernel.pack_codebook(codebook)
    assert panels.shape == (padded // 16, d, 16) and half_norms.shape == (padded,)
    # A panel count that is not the padded codebook's is refused, not read past or short.
    x = torch.randn(3, d)
    codes, distances = torch.empty(3, dtype=torch.int64), torch.empty(3)
    for count in (padded // 16 - 1, padded // 16 + 4):
        status = _cpu_kernel.library().vq_nearest_f32(
            *(x.data_ptr(), 3, d, d, panels.data_ptr(), half_norms.data_ptr(), count, k),
            *(codebook.data_ptr(), torch.zeros(d).data_ptr(), codes.data_ptr()),
            *(distances.data_ptr(), 240, 1, _cpu_kernel.isa_number("portable")),
        )
        assert status == -1, count


@needs_kernel
@pytest.mark.parametrize("n", [1, 17, 256, 1000, 5000, 65536, 65537, 262144])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_search_plan_splits_the_rows_into_equal_aligned_slices(
    n: int, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every thread gets its share of equal slices: no short last slice to leave one thread
    # idle while the other finishes, and every slice starts on a cache line of the outputs.
    monkeypatch.setattr(_cpu_kernel, "_MIN_WORK_PER_THREAD", 1)
    monkeypatch.setattr(_cpu_kernel, "max_threads", lambda: threads)
    plan = _cpu_kernel.search_plan(n, torch.randn(8, 4))
    per_slice, slices = plan.rows_per_slice, -(-n // plan.rows_per_slice)
    assert plan.threads == threads and per_slice % 16 == 0
    assert slices <= 8 * threads
    # As many slices as threads, as far as whole cache lines of rows allow.
    assert slices >= min(threads, -(-n // 16))
    # A slice sweeps the whole codebook: a batch that gives every thread 128 rows is not cut
    # finer than that.
    if n >= 128 * threads:
        assert per_slice >= 128
    if n >= 65536:
        assert slices == 8 * threads and n - (slices - 1) * per_slice > per_slice - 16 * slices


@needs_kernel
def test_compiled_center_is_the_float64_mean_of_the_finite_codes() -> None:
    g = torch.Generator().manual_seed(3)
    codebook = torch.randn(300, 7, generator=g) + 1000.0
    codebook[5, 2], codebook[17, 0], codebook[40, 6] = torch.nan, torch.inf, -torch.inf
    finite = torch.isfinite(codebook).all(-1)
    expected = codebook[finite].double().mean(0).float()
    assert torch.equal(_cpu_kernel.codebook_center_f32(codebook), expected)
    # None finite: zeros, as torch_search.codebook_center gives.
    assert torch.equal(
        _cpu_kernel.codebook_center_f32(torch.full((4, 3), torch.nan)), torch.zeros(3)
    )


@needs_kernel
def test_centring_and_packing_on_several_threads_match_one_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A codebook of 2 MiB takes two threads in both passes; the centre's partial sums are split
    # by codes, not threads, so the bits are the same on any count. Non-finite codes sit in
    # several chunks of the centre's split and on both sides of the packing's.
    g = torch.Generator().manual_seed(8)
    codebook = torch.randn(4100, 128, generator=g) * 3.0 + 500.0
    for row in (0, 255, 256, 2049, 4099):
        codebook[row, row % 128] = torch.nan if row % 2 else torch.inf
    finite = torch.isfinite(codebook).all(-1)
    assert codebook.numel() >= 2 * _cpu_kernel._MIN_CODEBOOK_FLOATS
    results = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(_cpu_kernel, "max_threads", lambda threads=threads: threads)
        center = _cpu_kernel.codebook_center_f32(codebook)
        results.append((center, *_cpu_kernel.pack_codebook(codebook, center)))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))
    center, panels, half_norms = results[0]
    torch.testing.assert_close(center, codebook[finite].double().mean(0).float(), rtol=0, atol=1e-4)
    assert torch.isinf(half_norms[:4100][~finite]).all()
    assert torch.isfinite(half_norms[:4100][finite]).all()
    codes = panels.transpose(1, 2).reshape(-1, 128)[:4100]  # back to [K, d]
    assert torch.equal(codes[finite], codebook[finite] - center)
    assert not codes[~finite].any()


@needs_kernel
def test_packing_less_a_center_packs_the_centred_codes() -> None:
    g = torch.Generator().manual_seed(4)
    codebook, center = torch.randn(70, 5, generator=g), torch.randn(5, generator=g)
    codebook[3] = torch.nan
    moved = codebook - center
    for got, want in zip(
        _cpu_kernel.pack_codebook(codebook, center), _cpu_kernel.pack_codebook(moved), strict=True
    ):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="center"):
        _cpu_kernel.pack_codebook(codebook, torch.zeros(4))


@needs_kernel
def test_kernel_rejects_what_it_cannot_read_safely() -> None:
    # A codebook narrower than the vectors would make the kernel read past its end.
    with pytest.raises(ValueError, match="codebook"):
        _cpu_kernel.nearest_codes_f32(torch.randn(10, 8), torch.randn(100, 4))
    with pytest.raises(ValueError, match="vectors"):
        _cpu_kernel.nearest_codes_f32(torch.randn(10, 8).double(), torch.randn(100, 8))
    with pytest.raises(ValueError, match="codebook"):
        _cpu_kernel.nearest_codes_f32(torch.randn(10, 8), torch.randn(0, 8))
    with pytest.raises(ValueError, match="codebook"):
        nearest_codes(torch.randn(10, 8), torch.randn(100, 4))


def test_zero_dimensional_codes_pick_the_first() -> None:
    codes, distances = nearest_codes(torch.randn(3, 0), torch.randn(4, 0))
    assert torch.equal(codes, torch.zeros(3, dtype=torch.int64))
    assert torch.equal(distances, torch.zeros(3))


@pytest.mark.parametrize(("status", "reason"), [(-2, "out of memory"), (-7, "unknown status")])
def test_a_kernel_status_becomes_an_error_that_names_it(status: int, reason: str) -> None:
    with pytest.raises(RuntimeError, match=f"status {status} \\({reason}\\)"):
        _cpu_kernel.check_status(status)
    _cpu_kernel.check_status(0)


def _search_in_child(vectors: torch.Tensor, codebook: torch.Tensor, expected: torch.Tensor) -> None:
    torch.set_num_threads(2)
    codes, _ = _cpu_kernel.nearest_codes_f32(vectors, codebook)
    raise SystemExit(0 if torch.equal(codes, expected) else 3)


@needs_kernel
def test_forked_child_searches_without_hanging() -> None:
    # The parent's OpenMP pool (started here) has no threads in a forked child; a parallel
    # region there would wait for them forever, so the child searches on one thread. 8000 x
    # 300 x 8 score evaluations are enough work for two threads in the parent.
    g = torch.Generator().manual_seed(8)
    vectors, codebook = torch.randn(8000, 8, generator=g), torch.randn(300, 8, generator=g)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected, _ = _cpu_kernel.nearest_codes_f32(vectors, codebook)
    finally:
        torch.set_num_threads(previous)
    context = multiprocessing.get_context("fork")
    child = context.Process(target=_search_in_child, args=(vectors, codebook, expected))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        child.join()
    assert child.exitcode == 0


@pytest.mark.slow
def test_torch_path_memory_stays_at_a_chunk() -> None:
    # The full N x K score matrix would be 128 MiB; one chunk's block is 1 MiB. Small results
    # allocated between freed blocks used to fragment the heap and let the peak grow with N.
    meter = PeakMemory(torch.device("cpu"))
    g = torch.Generator().manual_seed(5)
    vectors, codebook = torch.randn(65536, 8, generator=g), torch.randn(512, 8, generator=g)
    torch_nearest_codes(vectors, codebook)
    codes, peak = meter.measure(lambda: torch_nearest_codes(vectors, codebook))
    if peak is None:
        pytest.skip("peak resident memory is not measurable on this platform")
    assert peak < 24 * 2**20
    assert_nearest(vectors, codebook, codes)
