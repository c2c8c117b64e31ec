"""The `amx` path of the CPU search: scores on the AMX tiles in split bf16, and an exact
answer. Its tiles only choose candidates; each row gets the code the `avx512` path gives (the
first code of the least float32 score, bit for bit), or is left to that path. Checked against
the `avx512` path and the float64 brute force, on data made to sit near the bound: near ties,
exact ties, large offsets, tiny and huge magnitudes, rows the bound cannot cover. Skipped
where the CPU (or its OS) has no AMX."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.reference import assert_nearest, brute_force

import vqfunc
from vqfunc._kernels import cpu as _cpu_kernel
from vqfunc._kernels import fused_forward_cpu as _fused_cpu

pytestmark = pytest.mark.skipif(
    not _cpu_kernel.available() or "amx" not in _cpu_kernel.isa_paths(),
    reason="this CPU (or its OS) does not run the AMX path",
)


def _avx512(vectors: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _cpu_kernel.nearest_codes_f32(vectors, codebook, isa="avx512")


def _data(kind: str, n: int, d: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(k, d, generator=g)
    if kind == "gaussian":
        return torch.randn(n, d, generator=g), codebook
    if kind == "near codes":  # the nearest code barely ahead of the next ones
        picks = torch.randint(k, (n,), generator=g)
        return codebook[picks] + 1e-3 * torch.randn(n, d, generator=g), codebook
    if kind == "offset":  # a large common offset, small spread
        return 1e3 + torch.randn(n, d, generator=g), 1e3 + 0.1 * codebook
    if kind == "midpoints":  # halfway between two codes: two scores nearly equal
        a, b = torch.randint(k, (2, n), generator=g)
        return (codebook[a] + codebook[b]) / 2, codebook
    if kind == "integers":  # many exact ties between codes
        return (
            torch.randint(-2, 3, (n, d), generator=g).float(),
            torch.randint(-2, 3, (k, d), generator=g).float(),
        )
    if kind == "tiny":  # products below float32's normal range
        return 1e-21 * torch.randn(n, d, generator=g), 1e-21 * codebook
    if kind == "scales":  # codes of norms 100 times apart
        scale = torch.logspace(-1, 1, k).view(k, 1)
        return torch.randn(n, d, generator=g) * 10, codebook * scale
    if kind == "extreme scales":  # a million times apart: the bound (set by the largest
        scale = torch.logspace(-3, 3, k).view(k, 1)  # code) leaves most rows open
        return torch.randn(n, d, generator=g) * 10, codebook * scale
    raise AssertionError(kind)


KINDS = [
    "gaussian",
    "near codes",
    "midpoints",
    "offset",
    "integers",
    "tiny",
    "scales",
    "extreme scales",
]
SHAPES = [(300, 32, 512), (257, 33, 130), (61, 40, 2000), (256, 64, 1030), (40, 100, 77)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("n", "d", "k"), SHAPES)
def test_the_tiles_give_the_avx512_code_of_every_row_they_answer(
    kind: str, n: int, d: int, k: int
) -> None:
    vectors, codebook = _data(kind, n, d, k, seed=n + d + k + len(kind))
    codes = _cpu_kernel.amx_codes_f32(vectors, codebook)
    want, _ = _avx512(vectors, codebook)
    answered = codes >= 0
    assert torch.equal(codes[answered], want[answered])
    # Finite data of ordinary magnitude is answered by the tiles, near ties included (the
    # exact rescoring settles them), unless a row has too many candidates (integer data ties
    # often). Below float32's normal range the flushed bf16 products make the bound wider
    # than the scores: every code is a candidate and the rows are left open.
    if kind == "integers":
        assert answered.float().mean() > 0.5
    elif kind in ("tiny", "extreme scales"):
        assert answered.float().mean() < 0.5
    else:
        assert answered.all()
    assert_nearest(vectors[answered], codebook, codes[answered])


@given(
    n=st.integers(1, 300),
    d=st.integers(32, 96),
    k=st.integers(1, 700),
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**31 - 1),
)
@settings(max_examples=30, deadline=None)
def test_any_shape_and_data_give_the_avx512_codes(
    n: int, d: int, k: int, kind: str, seed: int
) -> None:
    vectors, codebook = _data(kind, n, d, k, seed)
    codes = _cpu_kernel.amx_codes_f32(vectors, codebook)
    answered = codes >= 0
    assert torch.equal(codes[answered], _avx512(vectors, codebook)[0][answered])


@pytest.mark.parametrize("k", [1100, 5000])
def test_codebooks_of_several_pieces(k: int) -> None:
    # Past 1024 codes the rows' candidates are carried from one piece of the codebook to the
    # next: the least score may come in any piece, and a near tie may span two.
    vectors, codebook = _data("near codes", 300, 32, k, seed=k)
    codebook[k - 1] = codebook[3]  # an exact tie in the last piece: code 3 must win
    vectors[:10] = codebook[3]
    codes = _cpu_kernel.amx_codes_f32(vectors, codebook)
    want, _ = _avx512(vectors, codebook)
    assert torch.equal(codes, want)
    assert torch.all(codes[:10] == 3)


@pytest.mark.parametrize("copies", [2, 16, 40])
def test_exact_ties_pick_the_first_code_or_are_left_open(copies: int) -> None:
    # Each code `copies` times in a row: every copy is a candidate. Up to 16 the exact scores
    # choose the first copy; more candidates than a row keeps leave the row to the AVX-512
    # tiles, which choose it too.
    g = torch.Generator().manual_seed(copies)
    base = torch.randn(40, 48, generator=g)
    picks = torch.randint(40, (300,), generator=g)
    vectors, codebook = base[picks], base.repeat_interleave(copies, 0)
    codes = _cpu_kernel.amx_codes_f32(vectors, codebook)
    if copies <= 16:
        assert torch.equal(codes, picks * copies)
    else:
        assert torch.all(codes == -1)
    searched, distances = _cpu_kernel.nearest_codes_f32(vectors, codebook, isa="amx")
    assert torch.equal(searched, picks * copies)
    assert torch.all(distances == 0)


def test_rows_the_bound_cannot_cover_are_left_open() -> None:
    g = torch.Generator().manual_seed(5)
    vectors, codebook = torch.randn(300, 32, generator=g), torch.randn(200, 32, generator=g)
    vectors[3, 7] = float("nan")
    vectors[4, 0] = float("inf")
    vectors[5] = 1e35  # past 2^100 times the codes' norm
    codes = _cpu_kernel.amx_codes_f32(vectors, codebook)
    assert codes[3:6].tolist() == [-1, -1, -1]
    assert torch.all(codes[6:] >= 0) and torch.all(codes[:3] >= 0)
    # The search answers those rows as the AVX-512 path does.
    assert torch.equal(
        _cpu_kernel.nearest_codes_f32(vectors, codebook, isa="amx")[0],
        _avx512(vectors, codebook)[0],
    )


def test_codes_with_non_finite_entries_are_never_chosen() -> None:
    g = torch.Generator().manual_seed(6)
    vectors, codebook = torch.randn(300, 32, generator=g), torch.randn(100, 32, generator=g)
    nearest = brute_force(vectors, codebook).argmin(1)
    codebook[nearest[0]] = float("nan")
    codebook[nearest[1], 4] = float("inf")
    codes = _cpu_kernel.amx_codes_f32(vectors, codebook)
    assert not torch.isin(codes, nearest[:2]).any()
    assert torch.equal(codes, _avx512(vectors, codebook)[0])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("n", "d", "k"), [(4000, 32, 512), (1000, 128, 300), (700, 256, 2100)])
def test_the_search_on_amx_is_the_avx512_search(threads: int, n: int, d: int, k: int) -> None:
    # Whole searches (several row blocks and slices, on one thread or two), codes and
    # distances bit for bit; and quantize's one-pass forward, every output.
    vectors, codebook = _data("gaussian", n, d, k, seed=n * d + k)
    vectors[n // 2, 0] = float("nan")  # an invalid row, left to the AVX-512 tiles
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _cpu_kernel.nearest_codes_f32(vectors, codebook, isa="amx")
        want = _avx512(vectors, codebook)
        forward = {}
        for isa in ("amx", "avx512"):
            with vqfunc.kernels.use(cpu="require", cpu_isa=isa):
                forward[isa] = _fused_cpu.search_and_forward(vectors.view(n, 1, d), codebook, None)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1].nan_to_num(7.0), want[1].nan_to_num(7.0))
    valid = torch.arange(n) != n // 2
    assert_nearest(vectors[valid], codebook, got[0][valid])
    (rows_amx, ppl_amx), (rows_avx512, ppl_avx512) = forward["amx"], forward["avx512"]
    for name in ("z", "out", "z_q", "codes", "distances", "valid", "num_invalid", "loss"):
        a, b = getattr(rows_amx, name), getattr(rows_avx512, name)
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), name
    assert torch.equal(rows_amx.histogram, rows_avx512.histogram)
    assert torch.equal(ppl_amx, ppl_avx512)
