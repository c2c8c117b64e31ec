"""Every ISA path of the compiled CPU kernels (AVX-512, AVX2 + FMA, portable C), forced through
the public policy (`vqfunc.kernels.use(cpu_isa=...)`), against the float64 brute force: codes,
distances, ties, non-finite rows and codes, and the straight-through outputs and gradients.
A path this CPU lacks is skipped with the reason; where it runs, nothing is skipped."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.reference import assert_nearest, brute_force

import vqfunc
from vqfunc._kernels import build as _build
from vqfunc._kernels import cpu as _cpu_kernel
from vqfunc._kernels import straight_through as _fused
from vqfunc._search import nearest_codes, uses_cpu_kernel

PATHS = ("portable", "avx2", "avx512", "amx")

needs_kernel = pytest.mark.skipif(
    not _cpu_kernel.available(), reason="the compiled CPU kernel does not build here"
)


def _runs(isa: str) -> bool:
    return _cpu_kernel.available() and isa in _cpu_kernel.isa_paths()


def _path_params() -> list[object]:
    return [
        pytest.param(
            isa,
            marks=pytest.mark.skipif(not _runs(isa), reason=f"this CPU does not run {isa}"),
        )
        for isa in PATHS
    ]


@pytest.fixture(params=_path_params())
def isa(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _search(isa: str, vectors: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with vqfunc.kernels.use(cpu="require", cpu_isa=isa):
        assert uses_cpu_kernel(vectors, codebook)
        return nearest_codes(vectors, codebook)


# Shapes that reach every specialised dimension, the generic one (with the small-d tiles and
# without), the large-d panel sweep, short last tiles and several code blocks.
SHAPES = [
    (37, 1, 5),
    (50, 4, 70),
    (53, 6, 300),
    (301, 8, 200),
    (97, 16, 64),
    (250, 32, 1030),
    (61, 33, 130),
    (130, 64, 300),
    (45, 70, 77),
    (30, 128, 90),
    (19, 256, 300),
]


@needs_kernel
@pytest.mark.parametrize(("n", "d", "k"), SHAPES)
def test_codes_and_distances_match_the_brute_force(isa: str, n: int, d: int, k: int) -> None:
    g = torch.Generator().manual_seed(n * 1000 + d + k)
    vectors, codebook = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    codes, distances = _search(isa, vectors, codebook)
    assert codes.dtype == torch.int64 and codes.shape == (n,)
    assert_nearest(vectors, codebook, codes)
    sq = brute_force(vectors, codebook)
    assert (codes == sq.argmin(1)).float().mean() > 0.99
    expected = sq.gather(1, codes.view(-1, 1)).squeeze(1).sqrt()
    torch.testing.assert_close(distances.double(), expected, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize(
    ("n", "d", "k"), [(301, 8, 200), (250, 32, 130), (45, 70, 77), (19, 200, 90)]
)
def test_rows_read_in_place_give_what_their_copy_gives(isa: str, n: int, d: int, k: int) -> None:
    # Rows whose floats are contiguous are read where they lie, at any row stride: a group's
    # columns of a wider matrix (offset, and the stride of the whole row), one row repeated
    # (stride 0); a transposed matrix is copied first.
    g = torch.Generator().manual_seed(n + d + k)
    wide, codebook = torch.randn(n, 3 * d + 5, generator=g), torch.randn(k, d, generator=g)
    views = [
        wide[:, d + 2 : 2 * d + 2],
        wide[:, :d],
        wide[7, :d].expand(n, d),
        torch.randn(d, n, generator=g).t(),
    ]
    for view in views:
        codes, distances = _search(isa, view, codebook)
        want_codes, want_distances = _search(isa, view.contiguous(), codebook)
        assert torch.equal(codes, want_codes) and torch.equal(distances, want_distances)
    assert_nearest(views[0], codebook, _search(isa, views[0], codebook)[0])


@needs_kernel
@pytest.mark.parametrize("d", [3, 8, 32, 64, 200])
@pytest.mark.parametrize("copies", [2, 5])
def test_ties_within_a_group_pick_the_first_code(isa: str, d: int, copies: int) -> None:
    # Each code repeated `copies` times in a row: the copies sit on neighbouring lanes of one
    # vector, or on the next vector of a panel, inside one group of codes.
    g = torch.Generator().manual_seed(d * 10 + copies)
    base = torch.randn(40, d, generator=g)
    picks = torch.randperm(40, generator=g)[:25]
    codes, distances = _search(isa, base[picks], base.repeat_interleave(copies, 0))
    assert torch.equal(codes, picks * copies)
    assert torch.all(distances == 0)


@needs_kernel
@pytest.mark.parametrize(("d", "period"), [(32, 16), (64, 16), (32, 64), (200, 16)])
def test_ties_on_one_lane_pick_the_first_code(isa: str, d: int, period: int) -> None:
    # Codes repeat every `period` codes: 16 puts the copies on the same lane of the next
    # vector (one group), 64 on the same lane of the next group.
    g = torch.Generator().manual_seed(d + period)
    base = torch.randn(period, d, generator=g)
    picks = torch.randint(period, (30,), generator=g)
    codes, distances = _search(isa, base[picks], base.repeat(6, 1))
    assert torch.equal(codes, picks)
    assert torch.all(distances == 0)


@needs_kernel
@pytest.mark.parametrize("d", [3, 8, 32, 64, 200])
def test_ties_pick_the_first_code(isa: str, d: int) -> None:
    g = torch.Generator().manual_seed(d)
    base = torch.randn(70, d, generator=g)
    picks = torch.randperm(70, generator=g)[:33]
    # Code j + 70 and j + 140 repeat code j; the vectors sit exactly on the repeated codes. The
    # copies lie on other lanes (70 is not a multiple of 16), often in later groups, and a
    # later copy's lane may be below the first one's.
    codes, distances = _search(isa, base[picks], torch.cat([base, base, base]))
    assert torch.equal(codes, picks)
    assert torch.all(distances == 0)


@needs_kernel
def test_non_finite_rows_and_codes(isa: str) -> None:
    g = torch.Generator().manual_seed(5)
    vectors, codebook = torch.randn(40, 8, generator=g), torch.randn(90, 8, generator=g)
    vectors[3] = float("nan")
    vectors[7, 2] = float("nan")
    codebook[[0, 11, 50]] = torch.tensor([float("nan"), float("inf"), -float("inf")]).view(3, 1)
    codes, _ = _search(isa, vectors, codebook)
    assert codes[3] == 0 and codes[7] == 0
    good = torch.ones(90, dtype=torch.bool)
    good[[0, 11, 50]] = False
    finite = torch.ones(40, dtype=torch.bool)
    finite[[3, 7]] = False
    assert not torch.isin(codes[finite], torch.tensor([0, 11, 50])).any()
    expected = brute_force(vectors[finite], codebook[good]).argmin(1)
    assert torch.equal(codes[finite], torch.arange(90)[good][expected])


@needs_kernel
def test_paths_agree_with_each_other(isa: str) -> None:
    g = torch.Generator().manual_seed(9)
    vectors, codebook = torch.randn(500, 24, generator=g), torch.randn(333, 24, generator=g)
    codes, distances = _search(isa, vectors, codebook)
    portable, portable_distances = _search("portable", vectors, codebook)
    # Near-ties may rank differently across paths (other rounding); nothing else.
    sq = brute_force(vectors, codebook)
    gap = sq.gather(1, codes.view(-1, 1)) - sq.gather(1, portable.view(-1, 1))
    assert torch.all(gap.abs() <= 1e-4)
    torch.testing.assert_close(distances, portable_distances, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("weighted", [False, True])
def test_straight_through_matches_float64(isa: str, weighted: bool) -> None:
    g = torch.Generator().manual_seed(3)
    z = torch.randn(300, 13, generator=g, requires_grad=True)
    book = torch.randn(40, 13, generator=g, requires_grad=True)
    codes = torch.randint(0, 40, (300,), generator=g)
    weights = torch.rand(300, generator=g) if weighted else None
    with vqfunc.kernels.use(cpu="require", cpu_isa=isa):
        out, _, loss = _fused.straight_through_with_loss(z, book, codes, beta=0.25, weights=weights)
        (out * torch.linspace(-1, 1, 13)).sum().add(loss).backward()
    z64 = z.detach().double().requires_grad_(True)
    book64 = book.detach().double().requires_grad_(True)
    q = book64[codes]
    w = torch.ones(300, dtype=torch.float64) if weights is None else weights.double()
    count = max(float(w.sum()) * 13, 1.0)
    loss64 = (
        0.75 * (w * ((z64 - q.detach()) ** 2).sum(1)).sum()
        + 0.25 * (w * ((z64.detach() - q) ** 2).sum(1)).sum()
    ) / count
    out64 = z64 + (q - z64).detach()
    (out64 * torch.linspace(-1, 1, 13).double()).sum().add(loss64).backward()
    torch.testing.assert_close(out.detach().double(), out64.detach())
    torch.testing.assert_close(loss.detach().double(), loss64.detach(), rtol=1e-5, atol=1e-7)
    assert z.grad is not None and book.grad is not None
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(book.grad.double(), book64.grad, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_fma_probe_reports_a_positive_rate(isa: str) -> None:
    rate = _cpu_kernel.fma_probe(isa, threads=1, rounds=1 << 12)
    assert rate > 0 and rate == rate


@needs_kernel
def test_status_names_the_path_in_use(isa: str) -> None:
    with vqfunc.kernels.use(cpu_isa=isa):
        entry = next(
            e
            for e in vqfunc.kernels.status()
            if (e.device, e.dtype, e.operation) == ("cpu", "float32", "nearest_codes")
        )
    assert entry.backend == "compiled"
    assert f"{isa} path (chosen)" in entry.reason


@needs_kernel
def test_auto_takes_the_fastest_path() -> None:
    with vqfunc.kernels.use(cpu_isa="auto"):
        entry = next(
            e
            for e in vqfunc.kernels.status()
            if (e.device, e.dtype, e.operation) == ("cpu", "float32", "nearest_codes")
        )
    assert f"{_cpu_kernel.isa_paths()[-1]} path" in entry.reason
    assert _cpu_kernel.isa_paths()[0] == "portable"


def test_an_unknown_path_is_refused_by_name() -> None:
    refused = pytest.raises(ValueError, match=r"cpu_isa: expected one of .* got 'sse9'")
    with refused, vqfunc.kernels.use(cpu_isa="sse9"):
        pass


@needs_kernel
def test_a_path_the_cpu_lacks_is_a_clear_error() -> None:
    missing = [isa for isa in PATHS if isa not in _cpu_kernel.isa_paths()]
    if not missing:
        pytest.skip("this CPU runs every path")
    refused = pytest.raises(RuntimeError, match=f"the {missing[0]} kernel path does not run")
    with refused, vqfunc.kernels.use(cpu_isa=missing[0]):
        pass


@needs_kernel
@pytest.mark.slow
@pytest.mark.parametrize("value", ["portable", "bogus"])
def test_environment_variable_chooses_the_path(value: str) -> None:
    script = (
        "import warnings, vqfunc\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    from vqfunc._kernels import policy\n"
        "print(vqfunc.kernels.settings().cpu_isa, policy.cpu_isa(), len(caught))\n"
    )
    env = {**os.environ, "VQFUNC_CPU_ISA": value}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    chosen, running, _ = done.stdout.split()
    if value == "portable":
        assert (chosen, running) == ("portable", "portable")
    else:
        assert chosen == "auto" and "VQFUNC_CPU_ISA='bogus'" in done.stderr


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-gcc") is None, reason="no aarch64 cross compiler on PATH"
)
def test_the_portable_path_builds_for_aarch64(tmp_path: Path) -> None:
    # Built from the package's own sources with the package's own command line and flags.
    for name, text in _build.source_files().items():
        (tmp_path / name).write_bytes(text)
    out = tmp_path / "cpu_kernels.so"
    flags = (*_build.FLAGS, *_build.OPENMP_FLAGS, "-Wall", "-Werror")
    command = _build.compile_command("aarch64-linux-gnu-gcc", flags, tmp_path, out)
    subprocess.run(command, check=True, capture_output=True, text=True)
    assert out.read_bytes()[:4] == b"\x7fELF" and out.read_bytes()[18] == 183  # EM_AARCH64
    symbols = subprocess.run(
        ["aarch64-linux-gnu-nm", "-D", "--defined-only", str(out)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for name in (
        "vq_nearest_f32",
        "vq_pack_f32",
        "vq_center_f32",
        "vq_isa_available",
        "vq_fma_probe",
        "vq_st_forward_f32",
        "vq_st_backward_f32",
    ):
        assert f" T {name}\n" in symbols
