"""The straight-through output and loss as custom operators: eager calls, `vmap`, `grad`,
`functional_call` and `torch.compile` run the same implementation, so eager and vmapped losses
and gradients agree bit for bit, and the operators are visible to the dispatcher."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vqfunc
from vqfunc import VQConfig
from vqfunc._estimators import straight_through, synchronized
from vqfunc._kernels import straight_through as _fused
from vqfunc._losses import commitment_loss


def _case(seed: int, batch: int = 3) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(batch, 300, 12, generator=g)
    codebook = torch.randn(20, 12, generator=g)
    codes = torch.randint(0, 20, (batch, 300), generator=g)
    weights = torch.rand(batch, 300, generator=g)
    return zs, codebook, codes, weights


def _objective(
    z: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor, w: torch.Tensor
) -> Any:
    out, z_q, loss = _fused.straight_through_with_loss(
        z, codebook, codes, beta=0.25, nu=0.3, weights=w
    )
    return (out * z.detach().cos()).sum() + (z_q * z.detach().sin()).sum() + 3.0 * loss, loss


@pytest.mark.parametrize("cpu", ["compiled", "torch"])
def test_eager_and_vmap_losses_and_gradients_are_bit_identical(cpu: str) -> None:
    zs, codebook, codes, weights = _case(0)
    with vqfunc.kernels.use(cpu=cpu):
        eager = []
        for i in range(zs.shape[0]):
            z, book = zs[i].clone().requires_grad_(True), codebook.clone().requires_grad_(True)
            total, loss = _objective(z, book, codes[i], weights[i])
            eager.append((loss.detach(), *torch.autograd.grad(total, (z, book))))

        def per_sample(z: torch.Tensor, c: torch.Tensor, w: torch.Tensor) -> Any:
            grad = torch.func.grad_and_value(
                lambda z, b: _objective(z, b, c, w), argnums=(0, 1), has_aux=True
            )
            (gz, gc), (_, loss) = grad(z, codebook)
            return loss, gz, gc

        batched = torch.func.vmap(per_sample)(zs, codes, weights)
    for i, want in enumerate(eager):
        for got, expected in zip(batched, want, strict=True):
            assert torch.equal(got[i], expected)


def test_quantize_loss_is_the_same_eagerly_and_under_vmap() -> None:
    cfg = VQConfig(feature_size=16, num_codes=64, dim=-1)
    params = vqfunc.init_params(cfg, generator=torch.Generator().manual_seed(1))
    xs = torch.randn(4, 200, 16, generator=torch.Generator().manual_seed(2))

    def loss(x: torch.Tensor) -> torch.Tensor:
        return vqfunc.quantize(params, x, cfg)[1].loss

    batched = torch.func.vmap(loss)(xs)
    for i in range(xs.shape[0]):
        assert torch.equal(batched[i], loss(xs[i]))


def _simple(
    z: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor, beta: float, nu: float, w: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    z_q = codebook[codes]
    return (
        synchronized(straight_through(z, z_q), z_q, nu),
        z_q,
        commitment_loss(z, z_q, beta, mask=w),
    )


class _Layer(torch.nn.Module):
    def __init__(self, codebook: torch.Tensor) -> None:
        super().__init__()
        self.codebook = torch.nn.Parameter(codebook.clone())

    def forward(self, z: torch.Tensor, codes: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return _objective(z, self.codebook, codes, w)[0]


def test_functional_call_gives_the_eager_gradient() -> None:
    zs, codebook, codes, weights = _case(3, batch=1)
    layer = _Layer(codebook)
    layer(zs[0], codes[0], weights[0]).backward()
    params = {"codebook": codebook.clone()}
    grads = torch.func.grad(
        lambda p: torch.func.functional_call(layer, p, (zs[0], codes[0], weights[0]))
    )(params)
    assert layer.codebook.grad is not None
    assert torch.equal(grads["codebook"], layer.codebook.grad)


class _Seen(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_operators_reach_the_dispatcher() -> None:
    zs, codebook, codes, weights = _case(4, batch=1)
    z, book = zs[0].clone().requires_grad_(True), codebook.clone().requires_grad_(True)
    with _Seen() as seen:
        total, _ = _objective(z, book, codes[0], weights[0])
        total.backward()
    assert "vqfunc.straight_through_forward.default" in seen.ops
    assert "vqfunc.straight_through_backward.default" in seen.ops


def test_operators_pass_opcheck() -> None:
    zs, codebook, codes, weights = _case(5, batch=1)
    z, book = zs[0, :40].clone().requires_grad_(True), codebook.clone().requires_grad_(True)
    c, w = codes[0, :40], weights[0, :40]
    torch.library.opcheck(
        torch.ops.vqfunc.straight_through_forward.default,
        (z, book, c, w, 0.25, 0.3),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
    g = torch.randn(40, 12)
    torch.library.opcheck(
        torch.ops.vqfunc.straight_through_backward.default,
        (z.detach(), book.detach(), c, w, g, None, torch.tensor(1.5), 0.25, 0.3, True, True),
        test_utils=("test_schema", "test_faketensor"),
    )


def _second_derivatives(fn: Any, z: torch.Tensor, book: torch.Tensor) -> tuple[torch.Tensor, ...]:
    z, book = z.clone().requires_grad_(True), book.clone().requires_grad_(True)
    out, z_q, loss = fn(z, book)
    total = (out * z.detach().cos()).sum() + (z_q * z.detach().sin()).sum() + 3.0 * loss
    gz, gc = torch.autograd.grad(total, (z, book), create_graph=True)
    second = (gz * z.detach().exp()).sum() + (gc * book.detach().tanh()).sum()
    return tuple(torch.autograd.grad(second, (z, book), materialize_grads=True))


@pytest.mark.parametrize("cpu", ["compiled", "torch"])
def test_double_backward_equals_the_composition_of_the_unfused_functions(cpu: str) -> None:
    zs, codebook, codes, weights = _case(6, batch=1)
    z, c, w = zs[0, :50], codes[0, :50], weights[0, :50]
    want = _second_derivatives(lambda z, b: _simple(z, b, c, 0.25, 0.3, w), z, codebook)
    assert want[0].abs().sum() > 0 and want[1].abs().sum() > 0
    with vqfunc.kernels.use(cpu=cpu):
        through_op = _second_derivatives(
            lambda z, b: torch.ops.vqfunc.straight_through_forward(z, b, c, w, 0.25, 0.3),
            z,
            codebook,
        )
        through_wrapper = _second_derivatives(
            lambda z, b: _fused.straight_through_with_loss(z, b, c, beta=0.25, nu=0.3, weights=w),
            z,
            codebook,
        )
    for got in (through_op, through_wrapper):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_compile_fullgraph_matches_eager_without_a_graph_break() -> None:
    zs, codebook, codes, weights = _case(7, batch=1)

    def forward(z: torch.Tensor, book: torch.Tensor) -> Any:
        return _objective(z, book, codes[0], weights[0])

    def eager() -> tuple[torch.Tensor, ...]:
        z, book = zs[0].clone().requires_grad_(True), codebook.clone().requires_grad_(True)
        total, loss = forward(z, book)
        return loss, *torch.autograd.grad(total, (z, book))

    torch._dynamo.reset()
    try:
        # Forward compiled whole, its backward by AOTAutograd.
        compiled = torch.compile(forward, fullgraph=True)
        z, book = zs[0].clone().requires_grad_(True), codebook.clone().requires_grad_(True)
        total, loss = compiled(z, book)
        got = (loss, *torch.autograd.grad(total, (z, book)))
        want = eager()
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)
    finally:
        torch._dynamo.reset()
