"""Nearest-code search on CUDA by a fused Triton kernel: optional, with a pure-torch fallback.

The kernel (`vqfunc/_triton_kernel.py`) computes the scores `||c||^2 / 2 - x.c` tile by tile
with `tl.dot` (float32 accumulation) and keeps a running minimum per row, so no score block
reaches memory: extra memory is the half norms `[K]` (and, while they are computed, a float32
copy of the codebook) besides the outputs. It reads float32,
float16 and bfloat16 tensors in their own dtype. float32 products use `input_precision="ieee"`
(not TF32), so the codes are as exact as the torch path's; half products use tensor cores.

Triton is imported on first use only; without it `available()` is false and vqfunc searches
with torch. Whether the kernel runs at all is decided by `vqfunc._kernels.policy` (torch is the
default on CUDA; `VQFUNC_TRITON=1` or `vqfunc.kernels.use(cuda="triton")` selects Triton).
A launch that fails (a Triton that cannot compile the kernel for this GPU, say) warns once,
naming the error, and switches the kernel off for the process: the search falls back to torch
instead of crashing.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor

from vqfunc._kernels.torch_search import centered_codebook, codebook_center

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The device type the kernel runs on: under Triton's interpreter (`TRITON_INTERPRET=1`, which
# `triton.jit` also reads when the kernel is defined) it runs on CPU tensors.
DEVICE_TYPE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
# Errors of failed launches; one is enough to stop using the kernel in this process. The
# library's one piece of module state besides the import cache: it only ever disables a path.
_failures: list[str] = []


class Blocks(NamedTuple):
    """Launch configuration: rows per program, codes and dimensions per tile, warps."""

    rows: int
    codes: int
    dims: int
    one_d_tile: bool
    num_warps: int


@functools.lru_cache(maxsize=1)
def _kernel_module() -> ModuleType | None:
    try:
        return importlib.import_module("vqfunc._kernels.triton_kernel")
    except Exception:  # no Triton, or one that fails to initialise: use torch instead
        return None


def available() -> bool:
    """Whether Triton imports and no launch of the kernel has failed."""
    return not _failures and _kernel_module() is not None


def failure() -> str:
    """Why `available()` is false (or "" when it is true)."""
    if _failures:
        return f"a launch failed: {_failures[0]}"
    if _kernel_module() is None:
        return "Triton does not import"
    return ""


def usable(vectors: Tensor, codebook: Tensor) -> bool:
    """Whether `search_codes` can run on these tensors: `applies` and `available()`."""
    return applies(vectors, codebook) and available()


def applies(vectors: Tensor, codebook: Tensor) -> bool:
    """Whether the kernel takes these tensors: 2-d CUDA tensors of one supported dtype."""
    return (
        vectors.device.type == DEVICE_TYPE
        and codebook.device.type == DEVICE_TYPE
        and vectors.dtype == codebook.dtype
        and vectors.dtype in DTYPES
        and vectors.dim() == 2
        and codebook.dim() == 2
        and vectors.shape[1] == codebook.shape[1]
    )


def block_sizes(num_rows: int, dim: int, dtype: torch.dtype) -> Blocks:
    """A fixed heuristic for Hopper-class GPUs (no autotuning, so the interpreter can test it).

    Half inputs take 128 x 128 score tiles on tensor cores; float32 (`ieee` products on the
    FMA units) takes 64 x 64 tiles, which keep its larger operands in registers. A row that
    fits one dimension tile (d <= 128 half, d <= 64 float32) is loaded once per program.
    `tl.dot` needs every block dimension >= 16; masks pad the rest with zeros.
    """
    half = dtype != torch.float32
    rows = 128 if half else 64
    codes = 128 if half else 64
    max_one_tile = 128 if half else 64
    # A small batch gets a smaller row block instead of mostly padding.
    rows = min(rows, max(16, _next_power_of_2(num_rows)))
    one_d_tile = dim <= max_one_tile
    dims = max(16, _next_power_of_2(dim)) if one_d_tile else (64 if half else 32)
    num_warps = 8 if rows * codes >= 128 * 128 else 4
    return Blocks(rows, codes, dims, one_d_tile, num_warps)


def _next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@torch.profiler.record_function("vqfunc.triton.nearest_codes")
def search_codes(vectors: Tensor, codebook: Tensor) -> Tensor:
    """Codes `[N]` (int64) of the nearest code of every row, by the Triton kernel.

    Args:
        vectors: `[N, d]` float32, float16 or bfloat16 tensor, any strides.
        codebook: `[K, d]` tensor of the same dtype and device, `K >= 1`.

    Returns:
        `[N]` int64 indices into `codebook`, the first of tied codes.
    """
    if vectors.dim() != 2 or codebook.dim() != 2 or vectors.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"vectors and codebook must be [N, d] and [K, d], got vectors of shape "
            f"{tuple(vectors.shape)} and codebook of shape {tuple(codebook.shape)}"
        )
    if vectors.dtype != codebook.dtype or vectors.dtype not in DTYPES:
        raise ValueError(
            f"vectors and codebook must share one dtype of {DTYPES}, got vectors of dtype "
            f"{vectors.dtype} and codebook of dtype {codebook.dtype}"
        )
    if vectors.device != codebook.device:
        raise ValueError(
            f"vectors and codebook must be on one device, got {vectors.device} and "
            f"{codebook.device}"
        )
    if codebook.shape[0] == 0:
        raise ValueError("codebook must hold at least one code, got shape (0, d)")
    module = _kernel_module()
    if module is None:
        raise RuntimeError("the Triton search kernel needs Triton, which does not import here")
    num_rows, dim = vectors.shape
    codes = torch.empty(num_rows, dtype=torch.int64, device=vectors.device)
    if num_rows == 0:
        return codes
    # Non-finite codes are never chosen, as on every backend (see torch_search). float32 is
    # centred on the codes' mean (one copy of the vectors); half inputs are not: rounding the
    # centred values to 11 bits would cost more exactness than the centring wins. Contiguous
    # codes: every program streams them all.
    center = codebook_center(codebook.float())
    if vectors.dtype != torch.float32:
        center = torch.zeros_like(center)
    moved, half_norms = centered_codebook(codebook.float(), center)
    codebook = moved.to(vectors.dtype).contiguous()
    if vectors.dtype == torch.float32:
        vectors = vectors - center
    blocks = block_sizes(num_rows, dim, vectors.dtype)
    grid = (-(-num_rows // blocks.rows),)
    # Triton launches on the current CUDA device: make it the tensors' one.
    with _on_device(vectors.device):
        _launch(module, grid, vectors, codebook, half_norms, codes, blocks)
    return codes


def _on_device(device: torch.device) -> contextlib.AbstractContextManager[object]:
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch(
    module: ModuleType,
    grid: tuple[int],
    vectors: Tensor,
    codebook: Tensor,
    half_norms: Tensor,
    codes: Tensor,
    blocks: Blocks,
) -> None:
    num_rows, dim = vectors.shape
    num_codes = codebook.shape[0]
    module.nearest_codes_kernel[grid](
        vectors,
        codebook,
        half_norms,
        codes,
        num_rows,
        num_codes,
        dim,
        vectors.stride(0),
        vectors.stride(1),
        codebook.stride(0),
        codebook.stride(1),
        BLOCK_N=blocks.rows,
        BLOCK_K=blocks.codes,
        BLOCK_D=blocks.dims,
        ONE_D_TILE=blocks.one_d_tile,
        # Exact float32 products (TF32 would keep 10 mantissa bits and miss near codes);
        # the setting does not apply to half operands.
        INPUT_PRECISION="ieee" if vectors.dtype == torch.float32 else "tf32",
        DOT_IN_F32=module.INTERPRETED and vectors.dtype == torch.bfloat16,
        num_warps=blocks.num_warps,
    )


def try_search_codes(vectors: Tensor, codebook: Tensor) -> Tensor | None:
    """`search_codes`, or None after a failed launch (warned once, then switched off).

    Out-of-memory errors are raised, not swallowed: the torch path would need as much.
    """
    try:
        return search_codes(vectors, codebook)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as error:
        if not _failures:
            warnings.warn(
                f"vqfunc's Triton search kernel failed ({type(error).__name__}: {error}); "
                "searching with torch instead (unset VQFUNC_TRITON to skip the kernel)",
                RuntimeWarning,
                stacklevel=2,
            )
        _failures.append(f"{type(error).__name__}: {error}")
        return None
