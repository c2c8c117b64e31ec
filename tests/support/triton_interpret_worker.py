"""Checks of the Triton search kernel: in Triton's interpreter on CPU, or compiled on CUDA.

`triton.jit` reads `TRITON_INTERPRET` when the kernel is defined, so the interpreter's checks
run in a process started with `TRITON_INTERPRET=1` (by `tests/test_triton_search.py`):

    TRITON_INTERPRET=1 python tests/support/triton_interpret_worker.py OUT.json cpu [CHECK ...]
    python tests/support/triton_interpret_worker.py OUT.json cuda [CHECK ...]

Every `check_*` function runs (or only the named ones); OUT.json maps each name to "ok" or to
the traceback of its failure.
"""

from __future__ import annotations

import json
import sys
import traceback
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

import vqfunc._kernels.triton_kernel as triton_kernel
from vqfunc._kernels import triton_search as _triton_search
from vqfunc._search import _exact_distances as exact_distances
from vqfunc._search import nearest_codes, torch_nearest_codes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests folder, for `support`
from support.profiling import kernel_calls
from support.reference import assert_nearest, brute_force

# The device of the checks' tensors: "cpu" under the interpreter, else "cuda" (set by `main`).
DEVICE = torch.device("cpu")

HALVES = (torch.float16, torch.bfloat16)
# (N, K, d): none a multiple of the blocks; d = 3, 8, 33 fit one dimension tile, d = 130 loops
# over tiles (for every dtype), d = 64 / 65 are float32's boundary between the two.
SHAPES = [
    (1, 1, 3),
    (37, 5, 8),
    (300, 130, 33),
    (37, 130, 130),
    (300, 5, 130),
    (1, 130, 8),
    (37, 1, 33),
    (37, 70, 64),
    (37, 70, 65),
]


def problem(n: int, k: int, d: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    vectors, codebook = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    return vectors.to(DEVICE, dtype), codebook.to(DEVICE, dtype)


def assert_exact_ties_aside(
    vectors: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor
) -> None:
    """Each code is the float64 argmin, except on rows whose two best codes are near-tied."""
    assert codes.dtype == torch.int64 and codes.shape == (vectors.shape[0],)
    assert_nearest(vectors, codebook, codes)
    sq = brute_force(vectors, codebook)
    exact = sq.argmin(1)
    scale = vectors.double().square().sum(-1) + codebook.double().square().sum(-1).max()
    if codebook.shape[0] > 1:
        two = sq.topk(2, dim=1, largest=False).values
        near_tie = two[:, 1] - two[:, 0] <= 1e-5 * scale
    else:
        near_tie = torch.zeros_like(exact, dtype=torch.bool)
    assert torch.all((codes == exact) | near_tie), (codes != exact).nonzero()


def check_float32_codes_are_exact() -> None:
    for i, (n, k, d) in enumerate(SHAPES):
        vectors, codebook = problem(n, k, d, torch.float32, i)
        assert_exact_ties_aside(vectors, codebook, _triton_search.search_codes(vectors, codebook))


def check_half_codes_are_exact_on_upcast_values() -> None:
    for dtype in HALVES:
        for i, (n, k, d) in enumerate(SHAPES[:6]):
            vectors, codebook = problem(n, k, d, dtype, 100 + i)
            codes = _triton_search.search_codes(vectors, codebook)
            # The brute force upcasts the very half values the kernel read.
            assert_exact_ties_aside(vectors, codebook, codes)


def check_distances_are_exact_and_float32_for_halves() -> None:
    for dtype in (torch.float32, *HALVES):
        vectors, codebook = problem(300, 130, 33, dtype, 7)
        codes = _triton_search.search_codes(vectors, codebook)
        distances = exact_distances(vectors, codebook, codes)  # the dispatcher's, from the codes
        assert distances.dtype == torch.float32 and distances.shape == (300,)
        expected = brute_force(vectors, codebook).gather(1, codes.view(-1, 1)).squeeze(1).sqrt()
        torch.testing.assert_close(distances.double(), expected, rtol=1e-5, atol=1e-5)


def check_ties_pick_the_first_code() -> None:
    g = torch.Generator().manual_seed(0)
    # Small integers whose mean is exactly zero (each code's negation is in the book too), so
    # the float32 centring on the codes' mean moves nothing: every product and sum is exact in
    # float32 whatever the summation order (which the interpreter's matrix product varies with
    # a column's place in the tile), copies of a code score exactly alike and the ties are real.
    half = torch.randint(-4, 5, (35, 8), generator=g).float()
    base = torch.cat([half, -half]).to(DEVICE)
    assert torch.unique(base, dim=0).shape[0] == 70
    picks = torch.randperm(70, generator=g)[:33].to(DEVICE)
    for dtype in (torch.float32, *HALVES):
        book = base.to(dtype)
        # Codes j + 70 and j + 140 repeat code j: copies in the same tile and in later ones
        # (64- and 128-code tiles), and the vectors sit exactly on the repeated codes.
        codes = _triton_search.search_codes(book[picks], torch.cat([book, book, book]))
        assert torch.equal(codes, picks), (dtype, codes, picks)
        # All codes equal: every row takes code 0, across several tiles.
        same = book[:1].expand(300, 8)
        codes = _triton_search.search_codes(book[picks], same)
        assert torch.equal(codes, torch.zeros(33, dtype=torch.int64, device=DEVICE)), dtype


def check_empty_batch_and_zero_dimensions() -> None:
    for dtype in (torch.float32, *HALVES):
        vectors = torch.zeros(0, 5, dtype=dtype, device=DEVICE)
        codebook = torch.randn(3, 5).to(DEVICE, dtype)
        codes = _triton_search.search_codes(vectors, codebook)
        distances = exact_distances(vectors, codebook, codes)
        assert codes.shape == (0,) and codes.dtype == torch.int64 and distances.shape == (0,)
    codes = _triton_search.search_codes(torch.randn(4, 0).to(DEVICE), torch.randn(6, 0).to(DEVICE))
    assert torch.equal(codes, torch.zeros(4, dtype=torch.int64, device=DEVICE))


def check_strided_vectors_and_codebook() -> None:
    g = torch.Generator().manual_seed(3)
    # Columns of a transposed matrix: vectors with stride (1, 37), a codebook with (1, 50).
    vectors = torch.randn(33, 37, generator=g).to(DEVICE).t()
    codebook = torch.randn(33, 50, generator=g).to(DEVICE).t()
    codes = _triton_search.search_codes(vectors, codebook)
    assert torch.equal(codes, _triton_search.search_codes(vectors.contiguous(), codebook))
    assert_exact_ties_aside(vectors, codebook, codes)


def check_non_finite_rows_give_valid_codes() -> None:
    vectors, codebook = problem(40, 90, 8, torch.float32, 4)
    vectors[3] = float("nan")
    with warnings.catch_warnings():
        # The interpreter's numpy reduction remarks on the all-NaN row.
        warnings.simplefilter("ignore", RuntimeWarning)
        codes = _triton_search.search_codes(vectors, codebook)
    assert int(codes.min()) >= 0 and int(codes.max()) < 90
    finite = torch.arange(40, device=DEVICE) != 3
    assert_exact_ties_aside(vectors[finite], codebook, codes[finite])


def check_non_finite_codes_are_never_chosen() -> None:
    for dtype in (torch.float32, *HALVES):
        vectors, codebook = problem(40, 90, 8, dtype, 5)
        codebook[7] = float("nan")
        codebook[0, 2] = float("inf")
        codes = _triton_search.search_codes(vectors, codebook)
        finite = torch.isfinite(codebook).all(-1)
        assert not (codes == 7).any() and not (codes == 0).any(), dtype
        kept = finite.nonzero().squeeze(1)
        assert_exact_ties_aside(vectors, codebook[finite], torch.searchsorted(kept, codes))
    nothing = torch.full((5, 8), float("nan"), device=DEVICE)
    codes = _triton_search.search_codes(problem(9, 5, 8, torch.float32, 6)[0], nothing)
    assert torch.equal(codes, torch.zeros(9, dtype=torch.int64, device=DEVICE))


def check_float32_codes_are_exact_under_an_offset() -> None:
    vectors, codebook = problem(300, 130, 33, torch.float32, 8)
    offset = 1000.0
    codes = _triton_search.search_codes(vectors + offset, codebook + offset)
    assert_exact_ties_aside(vectors, codebook, codes)


def check_search_op_runs_the_kernel() -> None:
    launch = "vqfunc.triton.nearest_codes"
    vectors, codebook = problem(50, 40, 16, torch.float32, 5)
    (codes, distances), calls = kernel_calls(lambda: nearest_codes(vectors, codebook))
    assert calls[launch] == 1, f"nearest_codes did not launch the Triton kernel: {calls}"
    assert_exact_ties_aside(vectors, codebook, codes)
    assert distances.dtype == torch.float32
    for dtype in HALVES:
        # Half tensors handed to the op as they are, as nearest_codes does on CUDA.
        z, c = problem(50, 40, 16, dtype, 6)
        (codes, distances), calls = kernel_calls(partial(torch.ops.vqfunc.nearest_codes, z, c))
        assert calls[launch] == 1 and distances.dtype == torch.float32
        assert_exact_ties_aside(z, c, codes)
        # Through nearest_codes: uncast on CUDA, upcast to float32 on CPU.
        (codes, distances), calls = kernel_calls(partial(nearest_codes, z, c))
        assert calls[launch] == 1 and distances.dtype == torch.float32
        assert_exact_ties_aside(z, c, codes)
    # The vmap rule pools a stack of vectors into one launch.
    stack, books = problem(3 * 20, 2 * 30, 8, torch.float32, 7)
    stack = stack.view(3, 20, 8)
    search = torch.func.vmap(nearest_codes, in_dims=(0, None))
    pooled, calls = kernel_calls(lambda: search(stack, books[:30]))
    assert calls[launch] == 1, calls
    for i in range(3):
        assert_exact_ties_aside(stack[i], books[:30], pooled[0][i])


def check_failed_launch_warns_once_and_falls_back() -> None:
    launch = triton_kernel.nearest_codes_kernel

    class Broken:
        def __getitem__(self, grid: tuple[int]) -> Callable[..., object]:
            raise RuntimeError("no kernel image for this device")

    triton_kernel.nearest_codes_kernel = Broken()  # type: ignore[assignment]
    try:
        vectors, codebook = problem(50, 40, 16, torch.float16, 8)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = torch.ops.vqfunc.nearest_codes(vectors, codebook)
            second = torch.ops.vqfunc.nearest_codes(vectors, codebook)
        ours = [w for w in caught if "Triton search kernel" in str(w.message)]
        assert len(ours) == 1 and "no kernel image" in str(ours[0].message), caught
        expected = torch_nearest_codes(vectors.float(), codebook.float())
        for codes, distances in (first, second):
            assert torch.equal(codes, expected) and distances.dtype == torch.float32
        assert not _triton_search.available()
    finally:
        triton_kernel.nearest_codes_kernel = launch
        _triton_search._failures.clear()


def main() -> None:
    global DEVICE
    out_path, device, *names = sys.argv[1:]
    DEVICE = torch.device(device)
    # The interpreter runs the kernel on CPU tensors; compiled, it runs on CUDA ones only.
    interpreting = DEVICE.type == "cpu"
    assert interpreting is triton_kernel.INTERPRETED, "TRITON_INTERPRET=1 for cpu, unset for cuda"
    assert DEVICE.type == _triton_search.DEVICE_TYPE  # read from TRITON_INTERPRET at import
    checks = {
        name: fn for name, fn in globals().items() if name.startswith("check_") and callable(fn)
    }
    results = {}
    for name in names or list(checks):
        try:
            checks[name]()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
    with open(out_path, "w") as file:
        json.dump(results, file)


if __name__ == "__main__":
    main()
