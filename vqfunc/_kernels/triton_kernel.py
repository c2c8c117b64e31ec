"""The Triton search kernel: fused scores and running argmin, one block of rows per program.

Importing this module needs Triton; `vqfunc._kernels.triton_search` imports it on first use only, so
vqfunc imports without Triton and pays Triton's import only when a CUDA search runs. With
`TRITON_INTERPRET=1` set before that first import, `triton.jit` builds an interpreted kernel
that runs on CPU tensors (how the tests check it on machines without a GPU).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Larger than any code index: the masked-out candidates of a tile's argmin.
_NO_CODE = tl.constexpr(2**31 - 1)


# The batch size changes from call to call: no recompilation for each (e.g. N == 1).
@triton.jit(do_not_specialize=["num_rows"])
def nearest_codes_kernel(
    vectors_ptr,
    codebook_ptr,
    half_norms_ptr,
    codes_ptr,
    num_rows,
    num_codes,
    dim,
    stride_vn,
    stride_vd,
    stride_ck,
    stride_cd,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ONE_D_TILE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_F32: tl.constexpr,
):
    """`codes[n] = argmin_k half_norms[k] - vectors[n] . codebook[k]`, first index on ties.

    One program owns `BLOCK_N` rows and sweeps the whole codebook in tiles of `BLOCK_K` codes
    (and of `BLOCK_D` dimensions when `ONE_D_TILE` is false), keeping a running minimum and its
    index per row in registers: no score is ever written to memory. `DOT_IN_F32` upcasts the
    operands before `tl.dot` (for the interpreter, whose bfloat16 product is wrong, see
    `INTERPRETED`); products of half values are exact in float32, so the scores are the same.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_rows
    # 64-bit offsets: N * d may pass 2**31 elements.
    row_offsets = rows.to(tl.int64) * stride_vn
    dims = tl.arange(0, BLOCK_D)
    tile_codes = tl.arange(0, BLOCK_K)

    if ONE_D_TILE:
        # The whole row fits one tile: load it once for every code tile.
        x_one = tl.load(
            vectors_ptr + row_offsets[:, None] + dims[None, :] * stride_vd,
            mask=row_ok[:, None] & (dims[None, :] < dim),
            other=0.0,
        )

    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_code = tl.zeros([BLOCK_N], tl.int32)
    for k0 in range(0, num_codes, BLOCK_K):
        codes = k0 + tile_codes
        code_ok = codes < num_codes
        code_offsets = codes.to(tl.int64) * stride_ck
        dots = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        if ONE_D_TILE:
            # Padded dimensions are zero in both operands, so they add nothing to the dot.
            c = tl.load(
                codebook_ptr + code_offsets[None, :] + dims[:, None] * stride_cd,
                mask=code_ok[None, :] & (dims[:, None] < dim),
                other=0.0,
            )
            if DOT_IN_F32:
                dots = tl.dot(x_one.to(tl.float32), c.to(tl.float32), dots, input_precision="ieee")
            else:
                dots = tl.dot(x_one, c, dots, input_precision=INPUT_PRECISION)
        else:
            for d0 in range(0, dim, BLOCK_D):
                d = d0 + dims
                d_ok = d < dim
                x = tl.load(
                    vectors_ptr + row_offsets[:, None] + d[None, :] * stride_vd,
                    mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0,
                )
                c = tl.load(
                    codebook_ptr + code_offsets[None, :] + d[:, None] * stride_cd,
                    mask=code_ok[None, :] & d_ok[:, None],
                    other=0.0,
                )
                if DOT_IN_F32:
                    dots = tl.dot(x.to(tl.float32), c.to(tl.float32), dots, input_precision="ieee")
                else:
                    dots = tl.dot(x, c, dots, input_precision=INPUT_PRECISION)
        # Padded codes get an infinite half norm, so they never win against a real code.
        half_norms = tl.load(half_norms_ptr + codes, mask=code_ok, other=float("inf"))
        scores = half_norms[None, :] - dots
        tile_best = tl.min(scores, axis=1)
        # The first code of the tile that reaches the tile's minimum (argmin's tie rule).
        at_best = (scores == tile_best[:, None]) & code_ok[None, :]
        tile_code = tl.min(tl.where(at_best, codes[None, :], _NO_CODE), axis=1)
        # Strictly better only: on a tie across tiles the earlier (lower) code stays. A NaN
        # score is never better, so rows of NaN keep code 0, a valid index.
        better = tile_best < best
        best_code = tl.where(better, tile_code, best_code)
        best = tl.where(better, tile_best, best)
    tl.store(codes_ptr + rows, best_code.to(tl.int64), mask=row_ok)


def _interpreted() -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(nearest_codes_kernel, InterpretedFunction)


# Whether `triton.jit` built the interpreter's kernel (`TRITON_INTERPRET=1` at import). The
# interpreter multiplies bfloat16 operands as their raw 16-bit integers (Triton 3.x stores
# them as uint16 and its `tl.dot` does not convert them), so it gets float32 operands instead.
INTERPRETED = _interpreted()
