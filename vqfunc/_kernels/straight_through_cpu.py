"""The compiled straight-through kernels (`csrc/straight_through.c`): ctypes wrappers.

`forward` and `backward` compute, for float32 CPU rows, what the operators of `straight_through`
compute chunk by chunk in torch, in one pass over the rows each: the selected codes (twice:
the straight-through output and `z_q`) with the weighted sum of squared differences, and the
gradients of `z` and of the codebook. The custom operators of `straight_through` call them for
float32 CPU tensors when the backend policy chooses the compiled kernels, and torch otherwise.

The checks here guard the memory the C code reads and writes: shapes, dtypes, devices and
strides are verified before any pointer reaches C, and codes are range-checked in C.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vqfunc._kernels import cpu as _cpu_kernel
from vqfunc._kernels import policy as _policy

# Below this many elements per thread a second thread costs more than it saves.
_MIN_ELEMENTS_PER_THREAD = 1 << 16
# Forward slices per thread.
_SLICES_PER_THREAD = 4


def plain(t: Tensor | None, dtype: torch.dtype = torch.float32) -> bool:
    # A plain CPU tensor whose memory holds its values: not a FakeTensor or other subclass, not
    # a functorch wrapper (vmap's batched or grad's tracking tensors), not a lazily negated view.
    return t is None or (
        type(t) in (Tensor, torch.nn.Parameter)
        and t.device.type == "cpu"
        and t.dtype == dtype
        and not t.is_neg()
        and not torch._C._functorch.is_functorch_wrapped_tensor(t)
    )


def applies(codes: Tensor, *tensors: Tensor | None) -> bool:
    """Whether `codes` (int64) and these float32 tensors (rows, codebook, weights, gradients)
    can go to the C kernels: plain CPU tensors, and the backend policy chooses the kernels."""
    return (
        plain(codes, torch.int64)
        and all(plain(t) for t in tensors)
        and _policy.cpu_kernel_runs(*tensors)
    )


def _threads(elements: int) -> int:
    return max(1, min(_cpu_kernel.max_threads(), elements // _MIN_ELEMENTS_PER_THREAD))


def _check(z: Tensor, codebook: Tensor, codes: Tensor, weights: Tensor | None) -> None:
    n, d = z.shape
    if codebook.dim() != 2 or codebook.shape[1] != d:
        raise ValueError(f"codebook: expected shape (K, {d}), got {tuple(codebook.shape)}")
    if codes.shape != (n,) or codes.dtype != torch.int64 or codes.device.type != "cpu":
        raise ValueError(
            f"codes: expected an int64 CPU tensor of shape ({n},), got {codes.dtype} "
            f"{tuple(codes.shape)} on {codes.device}"
        )
    if weights is not None and weights.shape != (n,):
        raise ValueError(f"weights: expected shape ({n},), got {tuple(weights.shape)}")
    for name, t in (("z", z), ("codebook", codebook), ("weights", weights)):
        if t is not None and not plain(t):
            raise ValueError(f"{name}: expected a float32 CPU tensor, got {t.dtype} on {t.device}")


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


@torch.profiler.record_function("vqfunc.cpu_kernel.straight_through_forward")
def forward(
    z: Tensor, codebook: Tensor, codes: Tensor, weights: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """`(codebook[codes], codebook[codes], sum_i w_i ||z_i - codebook[codes_i]||^2)`.

    `z [n, d]`, `codebook [K, d]`, `weights [n]` float32 on CPU, `codes [n]` int64. The sum is
    accumulated in float64 and returned as a float32 scalar tensor.
    """
    _check(z, codebook, codes, weights)
    lib = _cpu_kernel.library()
    z, codebook, codes = z.contiguous(), codebook.contiguous(), codes.contiguous()
    weights = None if weights is None else weights.contiguous()
    n, d = z.shape
    out = torch.empty_like(z)
    z_q = torch.empty_like(z)
    threads = _threads(n * d)
    # Several slices per thread, handed out dynamically; each sums into its own entry, and the
    # entries are added in order, so the loss does not depend on thread timing.
    slices = max(1, min(n, threads * _SLICES_PER_THREAD))
    partial = torch.zeros(slices, dtype=torch.float64)
    status = lib.vq_st_forward_f32(
        *(z.data_ptr(), codebook.data_ptr(), codes.data_ptr(), _ptr(weights)),
        *(codebook.shape[0], d, n, out.data_ptr(), z_q.data_ptr(), partial.data_ptr()),
        *(slices, threads, _cpu_kernel.isa_number(_policy.cpu_isa())),
    )
    _cpu_kernel.check_status(status)
    return out, z_q, partial.sum().to(torch.float32)


def _strides(name: str, g: Tensor | None, shape: tuple[int, ...]) -> tuple[Tensor | None, int, int]:
    """A gradient of `shape` with non-negative strides, and its row and column strides."""
    if g is None:
        return None, 0, 0
    if tuple(g.shape) != shape or not plain(g):
        raise ValueError(
            f"{name}: expected a float32 CPU tensor of shape {shape}, got {g.dtype} "
            f"{tuple(g.shape)} on {g.device}"
        )
    if min(g.stride(), default=0) < 0:
        g = g.contiguous()
    return g, g.stride(0), g.stride(1)


@torch.profiler.record_function("vqfunc.cpu_kernel.straight_through_backward")
def backward(
    z: Tensor,
    codebook: Tensor,
    codes: Tensor,
    weights: Tensor | None,
    grad_out: Tensor | None,
    grad_z_q: Tensor | None,
    *,
    a_z: float,
    a_q: float,
    nu: float,
    need_z: bool,
    need_codebook: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """`grad_z = grad_out + a_z w diff` and the codebook gradient, the scatter-add over rows of
    `a_q w diff + nu grad_out + grad_z_q`, with `diff = z - codebook[codes]` (see the C source).
    Either gradient is None when not needed; `grad_out` and `grad_z_q` may be None (zero) and
    any strides (an expanded gradient is read in place)."""
    _check(z, codebook, codes, weights)
    lib = _cpu_kernel.library()
    z, codebook, codes = z.contiguous(), codebook.contiguous(), codes.contiguous()
    weights = None if weights is None else weights.contiguous()
    n, d = z.shape
    k = codebook.shape[0]
    g, g_rs, g_cs = _strides("grad_out", grad_out, (n, d))
    gq, gq_rs, gq_cs = _strides("grad_z_q", grad_z_q, (n, d))
    grad_z = torch.empty_like(z) if need_z else None
    # Thread t computes rows [n t / T, n (t + 1) / T) of grad_z and, when it owns one of the B
    # codebook-gradient buffers, scatter-adds rows [n t / B, n (t + 1) / B) into it, in one
    # sweep over the rows. Buffer 0 is the result; the others (B - 1 codebooks of extra memory,
    # kept under half the size of the rows) are added to it at the end, in order.
    threads = _threads(n * d)
    books = min(threads, 1 + n // (2 * max(k, 1))) if need_codebook else 0
    grad_codebook = torch.zeros_like(codebook) if need_codebook else None
    extra = torch.zeros(max(books - 1, 0), k, d) if books > 1 else None
    status = lib.vq_st_backward_f32(
        *(z.data_ptr(), codebook.data_ptr(), codes.data_ptr(), _ptr(weights), k, d, n),
        *(_ptr(g), g_rs, g_cs, _ptr(gq), gq_rs, gq_cs),
        *(a_z, a_q, nu),
        *(_ptr(grad_z), _ptr(grad_codebook), _ptr(extra), books, threads),
        _cpu_kernel.isa_number(_policy.cpu_isa()),
    )
    _cpu_kernel.check_status(status)
    return grad_z, grad_codebook
