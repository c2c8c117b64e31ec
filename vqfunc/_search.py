"""Nearest-code search: the one hot path of the library.

`nearest_codes(vectors [N, d], codebook [K, d]) -> (codes [N], distances [N])`, exact
Euclidean nearest codes, ranked by `||c||^2 / 2 - z.c` (the same argmin as `||z - c||`).

Three implementations give the same codes (ties aside):

- a fused distance + argmin kernel for float32 on CPUs (AVX-512, AVX2 + FMA or portable paths)
  (`vqfunc/_kernels/csrc/nearest.c`, built by `vqfunc/_kernels/cpu.py`): it keeps a
  running minimum in registers and never writes a score to memory, so small code dimensions are
  not memory-bound;
- on CUDA, when asked for (`VQFUNC_TRITON=1` or `vqfunc.kernels.use(cuda="triton")`), a fused
  Triton kernel (`vqfunc/_kernels/triton_search.py`): tiles of scores from `tl.dot` reduced to
  a running minimum per row, reading float16 / bfloat16 inputs in their own dtype (float32
  accumulation). A kernel that fails to compile warns once and the search goes on in torch;
- pure torch everywhere else (float64, CUDA by default, other CPUs, or `VQFUNC_CPU_KERNEL=0`):
  chunked `addmm` + `argmin`, with chunks sized so that one `chunk x K` score block stays in
  cache.

Which one runs is decided by `vqfunc._kernels.policy` alone (see `vqfunc.kernels.status()`).

In every case peak extra memory is bounded by a chunk (a few KiB per thread in the CPU kernel,
the half norms `[K]` in the Triton one), never `N x K`.

The search is the custom operator `torch.ops.vqfunc.nearest_codes`, so it composes with
`torch.compile(fullgraph=True)` (a fake implementation gives shapes) and with `torch.func.vmap`
(a batching rule searches a stack of vectors against one codebook as one pooled batch and loops
over stacked codebooks). It has no gradient: codes are integers and the distances are
reported, not differentiated (`quantize` differentiates `z - z_q` itself).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vqfunc._kernels import cpu as _cpu_kernel
from vqfunc._kernels import policy as _policy
from vqfunc._kernels import torch_search as _torch_search
from vqfunc._kernels import triton_search as _triton_search
from vqfunc._kernels.transforms import plain_eager

# Rows per chunk of the exact distance computation (a `chunk x d` difference at a time).
_DISTANCE_ROWS = 1 << 14


def search_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision in which distances are ranked: float32 for half inputs, else unchanged."""
    return torch.promote_types(dtype, torch.float32)


def uses_cpu_kernel(vectors: Tensor, codebook: Tensor) -> bool:
    """Whether `nearest_codes` on these (search-dtype) tensors runs the compiled CPU kernel."""
    return _policy.cpu_kernel_runs(vectors, codebook)


def torch_nearest_codes(vectors: Tensor, codebook: Tensor) -> Tensor:
    """Codes `[N]` from the pure-torch search, whatever the device and dtype."""
    return _torch_search.search_codes(vectors, codebook)


def _exact_distances(vectors: Tensor, codebook: Tensor, codes: Tensor) -> Tensor:
    """`||vectors - codebook[codes]||` per row in the search dtype, a chunk of rows at a time."""
    # A no-op for float32 and float64; half inputs (the CUDA kernel's) are upcast a chunk at a time.
    dtype = search_dtype(torch.promote_types(vectors.dtype, codebook.dtype))
    vectors, codebook = vectors.detach(), codebook.detach()  # reported, not differentiated
    distances = torch.empty(vectors.shape[0], dtype=dtype, device=vectors.device)
    for s in range(0, vectors.shape[0], _DISTANCE_ROWS):
        rows = slice(s, s + _DISTANCE_ROWS)
        diff = vectors[rows].to(dtype) - codebook[codes[rows]].to(dtype)
        torch.linalg.vector_norm(diff, dim=-1, out=distances[rows])
    return distances


def _search(vectors: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """The operator's implementation: codes and distances of detached `[N, d]` against `[K, d]`."""
    if vectors.shape[0] > 0 and codebook.shape[0] > 0:
        if _policy.triton_runs(vectors, codebook):
            codes = _triton_search.try_search_codes(vectors, codebook)
            if codes is not None:
                return codes, _exact_distances(vectors, codebook, codes)
        elif uses_cpu_kernel(vectors, codebook):
            return _cpu_kernel.nearest_codes_f32(vectors, codebook, _policy.cpu_isa())
    # Half inputs arrive here only from CUDA (see `_keeps_input_dtype`): search in float32.
    dtype = search_dtype(torch.promote_types(vectors.dtype, codebook.dtype))
    vectors, codebook = vectors.to(dtype), codebook.to(dtype)
    codes = torch_nearest_codes(vectors, codebook)
    return codes, _exact_distances(vectors, codebook, codes)


# A registered operator (vmap rule, fake implementation) for the transforms and the tracer;
# plain eager calls take `_search` itself (see vqfunc._kernels.transforms).
_nearest_codes_op = torch.library.custom_op("vqfunc::nearest_codes", mutates_args=())(_search)


@_nearest_codes_op.register_fake
def _(vectors: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    n = vectors.shape[0]
    distance_dtype = search_dtype(torch.promote_types(vectors.dtype, codebook.dtype))
    return vectors.new_empty(n, dtype=torch.int64), vectors.new_empty(n, dtype=distance_dtype)


def _batching_rule(
    info: Any, in_dims: tuple[int | None, int | None], vectors: Tensor, codebook: Tensor
) -> tuple[tuple[Tensor, Tensor], tuple[int, int]]:
    vectors_dim, codebook_dim = in_dims
    if codebook_dim is None:
        # One codebook for the whole stack: search every row as one pooled batch, in the
        # stack's own memory order (no copy when it is contiguous).
        assert vectors_dim is not None
        batch_shape = vectors.shape[:-1]
        codes, distances = _nearest_codes_op(vectors.reshape(-1, vectors.shape[-1]), codebook)
        return (codes.view(batch_shape), distances.view(batch_shape)), (vectors_dim, vectors_dim)
    # Stacked codebooks: one search per codebook.
    books = codebook.movedim(codebook_dim, 0)
    rows = vectors if vectors_dim is None else vectors.movedim(vectors_dim, 0)
    results = [
        _nearest_codes_op(rows if vectors_dim is None else rows[i], books[i])
        for i in range(books.shape[0])
    ]
    codes = torch.stack([r[0] for r in results])
    distances = torch.stack([r[1] for r in results])
    return (codes, distances), (0, 0)


torch.library.register_vmap("vqfunc::nearest_codes", _batching_rule)


def nearest_codes(vectors: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """Index and Euclidean distance of the nearest code of every vector.

    Ranks by `||c||^2 / 2 - z.c` in at least float32 (float32 for half inputs), then computes
    the exact distance to the chosen code. Works under `torch.func.vmap` and `torch.compile`;
    carries no gradient.

    Args:
        vectors: `[N, d]` floating tensor.
        codebook: `[K, d]` floating tensor on the same device.

    Returns:
        codes: `[N]` int64 indices into `codebook` (the first of tied codes).
        distances: `[N]` Euclidean distances `||z - codebook[codes]||` in the search dtype.
    """
    z, c = vectors.detach(), codebook.detach()
    if not _keeps_input_dtype(z, c):
        dtype = search_dtype(torch.promote_types(z.dtype, c.dtype))
        z, c = z.to(dtype), c.to(dtype)
    return _search(z, c) if plain_eager(z, c) else _nearest_codes_op(z, c)


def _keeps_input_dtype(vectors: Tensor, codebook: Tensor) -> bool:
    """Whether half inputs reach the search op uncast: on CUDA, where the Triton kernel reads
    them directly (half the memory traffic of a float32 copy; the op upcasts if it falls back).

    Decided from devices and dtypes alone, so `torch.compile` traces it without a graph break.
    """
    return (
        vectors.device.type == "cuda"
        and codebook.device.type == "cuda"
        and vectors.dtype == codebook.dtype
        and vectors.dtype in (torch.float16, torch.bfloat16)
    )
