"""`python -m vqfunc.bench`: it runs, and every method finds the same codes (never timings)."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest
import torch

from vqfunc import bench


@pytest.fixture
def keep_threads():  # type: ignore[no-untyped-def]
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.usefixtures("keep_threads")
def test_quick_run_prints_a_table_where_all_methods_agree(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # glibc's defaults: retaining freed memory would stay in force for the rest of the tests.
    status = bench.main(["--quick", "--threads", "1", "--allocator", "system"])
    out = capsys.readouterr().out
    assert status == 0
    assert "malloc: system defaults" in out.splitlines()[0]
    table = out.split("\n\n")[-1].strip().splitlines()
    assert "search ms" in table[0] and "faiss" in table[0]
    rows = table[2:]
    assert len(rows) == len(bench.QUICK_SHAPES)
    for line, (n, d, k) in zip(rows, bench.QUICK_SHAPES, strict=True):
        assert line.split()[:3] == [str(n), str(d), str(k)]
        assert float(line.split()[-1]) >= 0.999


def test_bench_shape_compares_codes_of_every_method() -> None:
    rate = bench.gemm_rate(torch.device("cpu"), torch.float32, 1, size=128)
    row = bench.bench_shape((200, 16, 300), torch.device("cpu"), torch.float32, 1, rate)
    expected = {"quantize fwd", "cdist"}
    try:
        import faiss  # noqa: F401

        expected.add("faiss")
    except ImportError:
        pass
    assert set(row.agreement) == expected
    assert all(value >= 0.999 for value in row.agreement.values())
    assert set(row.times) >= {"search", "quantize fwd", "quantize fwd+bwd", "output writes"}
    assert set(row.times) >= expected
    assert row.floor == pytest.approx(2.0 * 200 * 300 * 16 / rate)


def test_bench_shape_takes_the_best_or_the_median_of_the_repeats(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each method's timed calls take 3, 1 and 2 seconds, in that order (counted per method).
    calls: dict[object, int] = {}

    def fake_once(fn: object, device: torch.device) -> float:
        calls[fn] = calls.get(fn, 0) + 1
        return (3.0, 1.0, 2.0)[(calls[fn] - 1) % 3]

    monkeypatch.setattr(bench._search, "_once", fake_once)
    monkeypatch.setattr(bench._search, "_SETTLE_SECONDS", 0.0)
    shape, cpu = (64, 8, 32), torch.device("cpu")
    best = bench.bench_shape(shape, cpu, torch.float32, 3, 1e9, statistic="best")
    calls.clear()
    median = bench.bench_shape(shape, cpu, torch.float32, 3, 1e9, statistic="median")
    assert set(best.times) == set(median.times) and "output writes" in best.times
    assert set(best.times.values()) == {1.0}
    assert set(median.times.values()) == {2.0}
    with pytest.raises(ValueError, match="statistic: expected 'best' or 'median', got 'mean'"):
        bench.bench_shape(shape, cpu, torch.float32, 1, 1e9, statistic="mean")


def test_each_timed_cpu_call_follows_the_pause_and_an_untimed_call_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events: list[str] = []
    search = bench._search.nearest_codes

    def logged_search(*args: object) -> object:
        events.append("search")
        return search(*args)  # type: ignore[arg-type]

    def timed(fn: Callable[[], object], device: torch.device) -> float:
        events.append("timed")
        fn()
        return 1.0

    monkeypatch.setattr(bench._search, "nearest_codes", logged_search)
    monkeypatch.setattr(bench._search, "_once", timed)
    monkeypatch.setattr(bench._search.time, "sleep", lambda seconds: events.append("pause"))
    bench.bench_shape((64, 8, 32), torch.device("cpu"), torch.float32, 2, 1e9)
    # Every repeat of every method pauses once before its timed call; the search's calls are
    # the ones logged, so each of its two rounds reads pause, untimed search, timed search.
    assert events.count("pause") == events.count("timed") >= 2 * 4
    round_ = ["pause", "search", "timed", "search"]
    assert sum(events[i : i + 4] == round_ for i in range(len(events))) == 2


def test_peak_memory_sees_a_large_allocation() -> None:
    meter = bench.PeakMemory(torch.device("cpu"))
    if not meter.cpu_supported:
        pytest.skip("peak resident memory is read from Linux's /proc")
    size = 64 << 20
    result, peak = meter.measure(lambda: torch.ones(size // 4).sum())
    if peak is None:
        pytest.skip("/proc/self/clear_refs is not writable here")
    assert result.item() == size // 4
    assert peak >= 0.9 * size
    _, small = meter.measure(lambda: torch.ones(16).sum())
    assert small is not None and small < size // 4


@pytest.mark.slow
@pytest.mark.usefixtures("keep_threads")
def test_lfq_cost_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--lfq", "6", "--rows", "300", "--repeats", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "bits=6, N=300" in out and "forward+backward ms" in out
    report = bench.lfq_check(4, 50, torch.device("cpu"), torch.float32, 1)
    assert report["full table MiB"] == pytest.approx(50 * 16 * 4 / 2**20)


def test_kmeans_error_equals_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    data, centroids = torch.randn(50, 3, generator=g), torch.randn(7, 3, generator=g)
    diff = data.double().unsqueeze(1) - centroids.double().unsqueeze(0)
    expected = diff.square().sum(-1).min(-1).values.mean().item()
    assert bench.kmeans_error(data, centroids) == pytest.approx(expected, rel=1e-12)


@pytest.mark.slow
@pytest.mark.usefixtures("keep_threads")
def test_kmeans_quick_run_prints_sane_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--kmeans", "--quick", "--threads", "1"]) == 0
    table = capsys.readouterr().out.split("\n\n")[-1].strip().splitlines()
    assert "vqfunc s" in table[0] and "faiss s" in table[0] and "sklearn s" in table[0]
    rows = table[2:]
    assert len(rows) == len(bench.KMEANS_QUICK_SHAPES)
    for line, (n, d, k) in zip(rows, bench.KMEANS_QUICK_SHAPES, strict=True):
        cells = line.replace("|", " ").split()
        assert cells[:3] == [str(n), str(d), str(k)]
        errors = [float(cells[i]) for i in (4, 6, 8) if cells[i] != "-"]
        # Standard-normal data: every error is below the data's own variance (d per point),
        # and vqfunc's is within a few percent of the best library's.
        assert all(0 < e < d for e in errors)
        assert errors[0] <= 1.15 * min(errors)


_FAULTS = textwrap.dedent(
    """
    import resource, sys, torch
    from vqfunc.bench._allocator import retain_freed_memory
    retained = retain_freed_memory() if sys.argv[1] == "retain" else False
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(48 << 18).sum()  # 48 MiB: above glibc's largest mmap threshold
    before = faults()
    for _ in range(8):
        torch.ones(48 << 18).sum()
    print(retained, faults() - before)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_retained_memory_is_reused_without_page_faults() -> None:
    counts = {}
    for mode in ("system", "retain"):
        run = subprocess.run(
            [sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True
        )
        retained, faults = run.stdout.split()
        counts[mode] = int(faults)
        if mode == "retain" and retained != "True":
            pytest.skip("the C library is not glibc")
    # Each fresh 48 MiB block faults in 12,288 pages of 4 KiB (fewer with huge pages), a
    # reused one none; the heap may still grow once or twice around other allocations.
    assert counts["system"] > 8 * 1000
    assert counts["retain"] <= counts["system"] / 4


def test_a_timed_call_runs_with_the_garbage_collector_paused() -> None:
    from vqfunc.bench._timing import _once

    seen: list[bool] = []

    def fn() -> None:
        seen.append(gc.isenabled())

    assert gc.isenabled()
    assert _once(fn, torch.device("cpu")) >= 0.0
    assert seen == [False] and gc.isenabled()
    # An error inside the call still turns the collector back on; one paused before stays so.
    with pytest.raises(ZeroDivisionError):
        _once(lambda: 1 / 0, torch.device("cpu"))
    assert gc.isenabled()
    gc.disable()
    try:
        _once(fn, torch.device("cpu"))
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_row_at_another_peak_keeps_its_times_and_rescales_its_floor() -> None:
    row = bench.bench_shape((64, 8, 32), torch.device("cpu"), torch.float32, 1, 1e9, 2e9)
    assert row.peak_floor == pytest.approx(2.0 * 64 * 32 * 8 / 2e9)
    faster = row.at_peak(4e9)
    assert faster.peak_floor == pytest.approx(row.peak_floor / 2)
    assert (faster.times, faster.floor, faster.shape) == (row.times, row.floor, row.shape)


@pytest.mark.slow
@pytest.mark.usefixtures("keep_threads")
def test_the_table_takes_the_best_fma_probe_of_the_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from vqfunc._kernels import cpu
    from vqfunc.bench import _cli
    from vqfunc.bench._peak import Peak

    if not cpu.available():
        pytest.skip("the FMA probe needs the compiled CPU kernels")
    rates = iter([100e9, 400e9, 200e9])  # the probe before the run, then one after each shape
    monkeypatch.setattr(_cli, "fma_peak", lambda repeats: Peak("avx2", next(rates), 1))
    shapes = "300,8,64;4096,64,1024"  # 1.3 ms at 400 GFLOP/s, 5.4 at 100
    assert (
        bench.main(["--quick", "--threads", "1", "--allocator", "system", "--shapes", shapes]) == 0
    )
    out = capsys.readouterr().out
    assert "FMA peak over the run: 400.0 GFLOP/s, the best of 3 probes (the slowest 100.0)" in out
    table = out.split("\n\n")[-1].strip().splitlines()
    for line, (n, d, k) in zip(table[2:], ((300, 8, 64), (4096, 64, 1024)), strict=True):
        peak_ms = float(line.split("|")[1].split()[1])
        assert peak_ms == pytest.approx(2.0 * n * k * d / 400e9 * 1e3, abs=0.06)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--shapes", "65536x32x512"], "--shapes: got '65536x32x512'"),
        (["--shapes", "64,8,16;64,0,16"], "'64,0,16' is not three positive integers"),
        (["--shapes", "64,8"], "'64,8' is not three positive integers"),
        (["--threads", "0"], "--threads: got '0', expected an integer >= 1"),
        (["--repeats", "two"], "--repeats: got 'two', expected an integer >= 1"),
    ],
)
def test_bad_arguments_are_refused_with_what_was_expected(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


def test_shapes_argument_reads_every_shape() -> None:
    from vqfunc.bench._cli import shapes_argument

    assert shapes_argument("64,8,16; 128,4,32") == [(64, 8, 16), (128, 4, 32)]


@pytest.mark.usefixtures("keep_threads")
def test_paths_are_compared_side_by_side(capsys: pytest.CaptureFixture[str]) -> None:
    from vqfunc._kernels import cpu as _cpu_kernel

    if not _cpu_kernel.available():
        pytest.skip("the compiled CPU kernel does not build here")
    paths = ["portable", _cpu_kernel.isa_paths()[-1]]
    status = bench.main(["--quick", "--threads", "1", "--paths", ",".join(paths)])
    table = capsys.readouterr().out.strip().splitlines()[1:]
    assert status == 0
    assert f"{paths[0]} ms" in table[0] and f"{paths[1]} ms" in table[0]
    rows = table[2:]
    assert [r.split()[:3] for r in rows] == [[str(v) for v in s] for s in bench.QUICK_SHAPES]
    assert all(r.split()[-1] == "yes" for r in rows)


def test_unknown_paths_are_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--paths", "avx512,sse9"])
    assert "--paths: got 'avx512,sse9': expected ISA paths" in capsys.readouterr().err
