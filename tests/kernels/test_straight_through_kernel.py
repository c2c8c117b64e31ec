"""The compiled straight-through kernels (`vqfunc/_kernels/csrc/straight_through.c`) against a
float64 reference: the outputs, the loss and both gradients of
`_fused.straight_through_with_loss` on float32 CPU rows, for every combination of weights,
synchronized update, gradient layouts (contiguous, expanded, transposed, absent) and thread
counts."""

from __future__ import annotations

import pytest
import torch
from support.profiling import kernel_calls

import vqfunc
from vqfunc._kernels import cpu as _cpu_kernel
from vqfunc._kernels import straight_through as _fused
from vqfunc._kernels import straight_through_cpu as _straight_through_cpu

FORWARD = "vqfunc.cpu_kernel.straight_through_forward"
BACKWARD = "vqfunc.cpu_kernel.straight_through_backward"
needs_kernel = pytest.mark.skipif(
    not _cpu_kernel.available(), reason="the compiled CPU kernel does not build here"
)


def _reference(
    z: torch.Tensor,
    codebook: torch.Tensor,
    codes: torch.Tensor,
    weights: torch.Tensor | None,
    grad_out: torch.Tensor | None,
    grad_z_q: torch.Tensor | None,
    grad_loss: float,
    beta: float,
    nu: float,
) -> tuple[torch.Tensor, ...]:
    """Loss, d/dz and d/dcodebook by autograd on the plain formulas, in float64."""
    z = z.double().requires_grad_(True)
    book = codebook.double().requires_grad_(True)
    z_q = book[codes]
    out = z + (z_q - z).detach()
    if nu > 0:
        out = out + nu * (z_q - z_q.detach())
    w = torch.ones(len(z), dtype=torch.float64) if weights is None else weights.double()
    count = max(float(w.sum()) * z.shape[1], 1.0)
    sq_commit = ((z - z_q.detach()) ** 2).sum(1)
    sq_book = ((z.detach() - z_q) ** 2).sum(1)
    loss = ((1 - beta) * (w * sq_commit).sum() + beta * (w * sq_book).sum()) / count
    task = grad_loss * loss
    if grad_out is not None:
        task = task + (out * grad_out.double()).sum()
    if grad_z_q is not None:
        task = task + (z_q * grad_z_q.double()).sum()
    gz, gc = torch.autograd.grad(task, (z, book))
    return loss.detach(), gz, gc


def _case(
    n: int, d: int, k: int, seed: int, weights: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g)
    codebook = torch.randn(k, d, generator=g)
    # Skewed codes: half the rows on code 0 (a collapsed codebook), the rest spread out.
    codes = torch.randint(0, k, (n,), generator=g)
    codes[torch.rand(n, generator=g) < 0.5] = 0
    w: torch.Tensor | None = None
    if weights == "bool":
        w = (torch.rand(n, generator=g) > 0.3).float()
    elif weights == "float":
        w = torch.rand(n, generator=g)
    return z, codebook, codes, w


def _gradient(kind: str, n: int, d: int, seed: int) -> torch.Tensor | None:
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "expanded":  # what `out.sum()` sends back: one value, strides (0, 0)
        return torch.full((), 0.5 + seed).expand(n, d)
    if kind == "row-expanded":  # one value per row, strides (1, 0)
        return torch.randn(n, 1, generator=g).expand(n, d)
    if kind == "transposed":
        return torch.randn(d, n, generator=g).t()
    return torch.randn(n, d, generator=g)


def _check_against_float64(
    weights: str, nu: float, grad_out: str, grad_z_q: str, threads: int, n: int, d: int, k: int
) -> None:
    z, codebook, codes, w = _case(n, d, k, n + d + k, weights)
    g_out = _gradient(grad_out, n, d, 1)
    g_q = _gradient(grad_z_q, n, d, 2)
    beta, grad_loss = 0.8, 1.7
    assert _straight_through_cpu.applies(codes, z, codebook, w, g_out, g_q)
    with vqfunc.kernels.use(cpu="torch"):
        assert not _straight_through_cpu.applies(codes, z, codebook, w, g_out, g_q)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, z_q, total = _straight_through_cpu.forward(z, codebook, codes, w)
        count = max(float(w.sum()) * d, 1.0) if w is not None else float(n * d)
        scale = 2.0 * grad_loss / count
        gz, gc = _straight_through_cpu.backward(
            *(z, codebook, codes, w, g_out, g_q),
            a_z=(1 - beta) * scale,
            a_q=-beta * scale,
            nu=nu,
            need_z=True,
            need_codebook=True,
        )
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(out, codebook[codes]) and torch.equal(z_q, codebook[codes])
    loss, want_gz, want_gc = _reference(z, codebook, codes, w, g_out, g_q, grad_loss, beta, nu)
    torch.testing.assert_close(total.double() / count, loss, rtol=1e-5, atol=1e-6)
    assert gz is not None and gc is not None
    torch.testing.assert_close(gz.double(), want_gz, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gc.double(), want_gc, rtol=1e-5 * max(1.0, n / 300), atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("weights", ["none", "bool", "float"])
@pytest.mark.parametrize("nu", [0.0, 0.4])
@pytest.mark.parametrize(
    "grad_out", ["contiguous", "expanded", "row-expanded", "transposed", "none"]
)
@pytest.mark.parametrize("grad_z_q", ["contiguous", "expanded", "none"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("n", "d", "k"), [(300, 8, 7), (257, 13, 40), (64, 37, 3)])
def test_kernel_equals_the_float64_formulas(
    weights: str,
    nu: float,
    grad_out: str,
    grad_z_q: str,
    threads: int,
    n: int,
    d: int,
    k: int,
) -> None:
    _check_against_float64(weights, nu, grad_out, grad_z_q, threads, n, d, k)


@needs_kernel
@pytest.mark.parametrize("weights", ["none", "float"])
@pytest.mark.parametrize("grad_out", ["contiguous", "transposed"])
def test_two_threads_on_enough_work_equal_the_float64_formulas(weights: str, grad_out: str) -> None:
    # 4099 x 33 elements: enough work for the kernel to split it between two threads.
    _check_against_float64(weights, 0.4, grad_out, "contiguous", 2, 4099, 33, 9)


@needs_kernel
def test_fused_function_takes_the_kernel_and_agrees_with_the_torch_path() -> None:
    z, codebook, codes, w = _case(500, 24, 30, 9, "float")

    def run() -> tuple[torch.Tensor, ...]:
        zz = z.clone().requires_grad_(True)
        book = codebook.clone().requires_grad_(True)
        out, z_q, loss = _fused.straight_through_with_loss(
            zz, book, codes, beta=0.6, nu=0.2, weights=w
        )
        task = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
        task = task + z_q.square().sum() + 2.0 * loss
        return (out.detach(), loss.detach(), *torch.autograd.grad(task, (zz, book)))

    with_kernel, calls = kernel_calls(run)
    assert calls == {FORWARD: 1, BACKWARD: 1}
    with vqfunc.kernels.use(cpu="torch"):
        with_torch, calls = kernel_calls(run)
    assert not calls
    for a, b in zip(with_kernel, with_torch, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _plain_backward(
    z: torch.Tensor,
    codebook: torch.Tensor,
    codes: torch.Tensor,
    grad_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Both gradients with unit coefficients, no weights, no synchronized update or `z_q`."""
    coefficients = {"a_z": 1.0, "a_q": 1.0, "nu": 0.0}
    return _straight_through_cpu.backward(
        *(z, codebook, codes, None, grad_out, None), **coefficients, need_z=True, need_codebook=True
    )


@needs_kernel
def test_empty_batch() -> None:
    z, codebook = torch.zeros(0, 5), torch.randn(4, 5)
    codes = torch.zeros(0, dtype=torch.int64)
    out, z_q, total = _straight_through_cpu.forward(z, codebook, codes, None)
    assert out.shape == z_q.shape == (0, 5) and total.item() == 0.0
    gz, gc = _plain_backward(z, codebook, codes)
    assert gz is not None and gz.shape == (0, 5)
    assert gc is not None and torch.equal(gc, torch.zeros(4, 5))


@needs_kernel
def test_codes_out_of_range_raise_instead_of_reading_past_the_codebook() -> None:
    z, codebook = torch.randn(10, 4), torch.randn(3, 4)
    for bad in (3, -1):
        codes = torch.zeros(10, dtype=torch.int64)
        codes[7] = bad
        with pytest.raises(RuntimeError, match="status -3"):
            _straight_through_cpu.forward(z, codebook, codes, None)
        with pytest.raises(RuntimeError, match="status -3"):
            _plain_backward(z, codebook, codes)


@needs_kernel
def test_wrong_shapes_and_dtypes_are_refused_before_c_reads_them() -> None:
    z, codebook, codes = torch.randn(6, 4), torch.randn(3, 4), torch.zeros(6, dtype=torch.int64)
    with pytest.raises(ValueError, match="codebook"):
        _straight_through_cpu.forward(z, torch.randn(3, 5), codes, None)
    with pytest.raises(ValueError, match="codes"):
        _straight_through_cpu.forward(z, codebook, codes[:5], None)
    with pytest.raises(ValueError, match="weights"):
        _straight_through_cpu.forward(z, codebook, codes, torch.ones(5))
    with pytest.raises(ValueError, match="grad_out"):
        _plain_backward(z, codebook, codes, torch.ones(6, 5))
    assert _straight_through_cpu.applies(codes, z, codebook)
    assert not _straight_through_cpu.applies(codes, z.double(), codebook)
    assert not _straight_through_cpu.applies(codes.int(), z, codebook)
    assert not _straight_through_cpu.applies(codes, z, torch._neg_view(codebook))


@needs_kernel
def test_double_backward_agrees_with_the_torch_path() -> None:
    z, codebook, codes, w = _case(80, 6, 5, 4, "float")

    def second_derivative() -> torch.Tensor:
        # As in `commitment_loss`, the z term stops the gradient of the codes: the z gradient
        # depends on z (and not on the codebook), the codebook gradient on the codebook.
        zz = z.clone().requires_grad_(True)
        book = codebook.clone().requires_grad_(True)
        _, _, loss = _fused.straight_through_with_loss(zz, book, codes, beta=0.3, weights=w)
        gz, gc = torch.autograd.grad(loss, (zz, book), create_graph=True)
        second = (gz * zz.detach().cos()).sum() + (gc * book.detach().sin()).sum()
        return torch.cat([g.flatten() for g in torch.autograd.grad(second, (zz, book))])

    with_kernel_available = second_derivative()
    with vqfunc.kernels.use(cpu="torch"):
        torch.testing.assert_close(with_kernel_available, second_derivative())
    assert with_kernel_available.abs().sum() > 0
