"""The Triton search kernel, checked in Triton's interpreter on CPU, and its wiring into search.

The kernel checks live in `tests/support/triton_interpret_worker.py` and run in one child process
with `TRITON_INTERPRET=1` (`triton.jit` reads it when the kernel is defined, so this process, whose
kernel would be the compiled one, cannot run them); on a machine with a GPU they also run
compiled, on CUDA tensors. The wiring tests need no Triton.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import vqfunc
from vqfunc._kernels import policy as _policy
from vqfunc._kernels import triton_search as _triton_search
from vqfunc._search import _keeps_input_dtype, nearest_codes, torch_nearest_codes

WORKER = Path(__file__).resolve().parents[1] / "support" / "triton_interpret_worker.py"
CHECKS = (
    "check_float32_codes_are_exact",
    "check_half_codes_are_exact_on_upcast_values",
    "check_distances_are_exact_and_float32_for_halves",
    "check_ties_pick_the_first_code",
    "check_empty_batch_and_zero_dimensions",
    "check_strided_vectors_and_codebook",
    "check_non_finite_rows_give_valid_codes",
    "check_non_finite_codes_are_never_chosen",
    "check_float32_codes_are_exact_under_an_offset",
    "check_search_op_runs_the_kernel",
    "check_failed_launch_warns_once_and_falls_back",
)
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)


def run_worker(out: Path, device: str) -> dict[str, str]:
    """Every check of the worker on `device`: "cpu" in the interpreter, "cuda" compiled."""
    env = {**os.environ, "VQFUNC_TRITON": "1", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    run = subprocess.run(
        [sys.executable, str(WORKER), str(out), device, *CHECKS],
        env=env,
        cwd=WORKER.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    results: dict[str, str] = json.loads(out.read_text())
    return results


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return run_worker(tmp_path_factory.mktemp("triton") / "results.json", "cpu")


@pytest.mark.slow
@needs_triton
@pytest.mark.parametrize("check", CHECKS)
def test_kernel_in_interpreter(check: str, interpreter_results: dict[str, str]) -> None:
    assert interpreter_results[check] == "ok", interpreter_results[check]


@pytest.mark.slow
@needs_triton
@pytest.mark.cuda
def test_kernel_on_cuda(tmp_path: Path) -> None:
    # The same checks, compiled for and run on the GPU.
    results = run_worker(tmp_path / "results.json", "cuda")
    failed = {name: trace for name, trace in results.items() if trace != "ok"}
    assert not failed, "\n".join(failed.values())


def test_every_worker_check_is_run() -> None:
    defined = re.findall(r"^def (check_\w+)", WORKER.read_text(), flags=re.MULTILINE)
    assert sorted(defined) == sorted(CHECKS)


def test_imports_and_searches_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import triton` raise ImportError.
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "vqfunc._kernels.triton_kernel", raising=False)
    _triton_search._kernel_module.cache_clear()
    try:
        assert not _triton_search.available()
        g = torch.Generator().manual_seed(0)
        vectors, codebook = torch.randn(30, 8, generator=g), torch.randn(20, 8, generator=g)
        assert not _triton_search.usable(vectors, codebook)
        codes, _ = nearest_codes(vectors, codebook)
        assert torch.equal(codes, torch_nearest_codes(vectors, codebook))
        with pytest.raises(RuntimeError, match="Triton"):
            _triton_search.search_codes(vectors, codebook)
    finally:
        _triton_search._kernel_module.cache_clear()


def test_torch_is_the_default_on_cuda() -> None:
    # Whether the chosen Triton search runs on the kernel's tensors is checked by the worker,
    # where the interpreter makes CPU tensors the kernel's.
    assert _policy.settings().cuda == "torch"
    entries = [e for e in vqfunc.kernels.status() if e.device == "cuda"]
    assert all(e.backend == "torch" for e in entries)
    assert any("until a GPU benchmark" in e.reason for e in entries)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_tensors_never_take_the_triton_path(dtype: torch.dtype) -> None:
    vectors, codebook = torch.randn(4, 3).to(dtype), torch.randn(5, 3).to(dtype)
    assert not _triton_search.usable(vectors, codebook)
    assert not _keeps_input_dtype(vectors, codebook)


def test_half_inputs_given_to_the_op_fall_back_in_float32() -> None:
    # What a CUDA half search does without Triton: the op upcasts before the torch path.
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float16, torch.bfloat16):
        vectors = torch.randn(40, 8, generator=g).to(dtype)
        codebook = torch.randn(30, 8, generator=g).to(dtype)
        codes, distances = torch.ops.vqfunc.nearest_codes(vectors, codebook)
        expected = nearest_codes(vectors.float(), codebook.float())
        assert distances.dtype == torch.float32
        assert torch.equal(codes, expected[0])
        torch.testing.assert_close(distances, expected[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_cuda_output_dtypes_are_unchanged(dtype: torch.dtype) -> None:
    # Fake CUDA tensors (no GPU needed): half inputs reach the op uncast, and the outputs keep
    # the dtypes of the float32 search.
    with FakeTensorMode():
        vectors = torch.empty(10, 8, device="cuda", dtype=dtype)
        codebook = torch.empty(5, 8, device="cuda", dtype=dtype)
        assert _keeps_input_dtype(vectors, codebook) == (dtype in (torch.float16, torch.bfloat16))
        codes, distances = nearest_codes(vectors, codebook)
        mixed_codes, mixed_distances = nearest_codes(vectors, codebook.float())
    assert codes.dtype == mixed_codes.dtype == torch.int64
    assert distances.dtype == torch.promote_types(dtype, torch.float32)
    assert mixed_distances.dtype == torch.promote_types(dtype, torch.float32)
    assert distances.device.type == "cuda" and distances.shape == (10,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 17, 100, 70_000])
@pytest.mark.parametrize("d", [0, 1, 16, 33, 64, 65, 128, 129, 512])
def test_block_sizes(dtype: torch.dtype, n: int, d: int) -> None:
    blocks = _triton_search.block_sizes(n, d, dtype)
    for size in (blocks.rows, blocks.codes, blocks.dims):
        # tl.dot needs every block dimension >= 16; tl.arange needs powers of two.
        assert size >= 16 and size & (size - 1) == 0
    assert blocks.rows <= 128 and blocks.codes <= 128
    if blocks.one_d_tile:
        assert blocks.dims >= d
    assert blocks.one_d_tile == (d <= (64 if dtype == torch.float32 else 128))


@needs_triton
@pytest.mark.parametrize(
    ("dtype", "dim"), [(torch.float32, 33), (torch.bfloat16, 64), (torch.float16, 200)]
)
def test_kernel_compiles_for_hopper(dtype: torch.dtype, dim: int) -> None:
    # Ahead-of-time compilation to sm_90 machine code (Triton's bundled ptxas; no GPU needed):
    # the lowering the interpreter skips. Half operands must reach the tensor cores (wgmma).
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vqfunc._kernels.triton_kernel import nearest_codes_kernel

    blocks = _triton_search.block_sizes(70_000, dim, dtype)
    element = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    constants = {
        "stride_vd": 1,
        "stride_cd": 1,
        "BLOCK_N": blocks.rows,
        "BLOCK_K": blocks.codes,
        "BLOCK_D": blocks.dims,
        "ONE_D_TILE": blocks.one_d_tile,
        "INPUT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "DOT_IN_F32": False,
    }
    signature = {
        "vectors_ptr": f"*{element}",
        "codebook_ptr": f"*{element}",
        "half_norms_ptr": "*fp32",
        "codes_ptr": "*i64",
        **{name: "i32" for name in ("num_rows", "num_codes", "dim", "stride_vn", "stride_ck")},
        **{name: "constexpr" for name in constants},
    }
    try:
        source = ASTSource(nearest_codes_kernel, signature, constants)
    except (TypeError, KeyError, ValueError) as error:  # another Triton's signature format
        pytest.skip(f"this Triton's ahead-of-time API differs: {error}")
    compiled = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": blocks.num_warps}
    )
    assert compiled.asm["cubin"]
    assert ("wgmma" in compiled.asm["ptx"]) == (dtype != torch.float32)
