"""When vqfunc's operators may be skipped for their implementation (`vqfunc._kernels.transforms`):
only in plain eager calls, never under a transform, the tracer, a mode, or on a subclass."""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from vqfunc._kernels.transforms import modes_active, plain_eager, traced_or_transformed


class _Dispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


class _Function(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


class _Subclass(torch.Tensor):
    pass


def test_plain_eager_only_outside_transforms_modes_and_subclasses() -> None:
    x = torch.zeros(3)
    assert plain_eager(x, x) and not modes_active() and not traced_or_transformed()
    assert not plain_eager(x, x.as_subclass(_Subclass))
    # A parameter is a subclass in name only: a layer's codebook takes the direct route.
    assert plain_eager(x, torch.nn.Parameter(x))
    assert not plain_eager(torch.nn.Parameter(x).as_subclass(_Subclass))
    with _Dispatch():
        assert modes_active() and not plain_eager(x)
    with _Function():
        assert modes_active() and not plain_eager(x)
    seen = torch.func.vmap(lambda t: torch.tensor(float(plain_eager(t))))(torch.zeros(2, 3))
    assert not seen.any()
    compiled = torch.compile(lambda t: t + float(traced_or_transformed()), backend="eager")
    assert torch.equal(compiled(torch.zeros(1)), torch.ones(1))


def test_a_layer_quantizes_without_the_registered_operator(monkeypatch: Any) -> None:
    # The layer hands its codebook parameter to the fused quantizer; in a plain eager call the
    # operator's dispatch (some 40 us a call) is not needed, forward or backward.
    from vqfunc import VectorQuantize
    from vqfunc import _fused_quantize as fq

    layer = VectorQuantize(8, 16, dim=-1)
    x = torch.randn(5, 8, requires_grad=True)
    assert type(layer.params.codebook) is torch.nn.Parameter
    z_q, misc = layer(x)
    expected = torch.autograd.grad(z_q.sum() + misc["loss"], (x, layer.params.codebook))

    def refuse(*args: Any) -> Any:
        raise AssertionError("the registered operator ran in a plain eager call")

    monkeypatch.setattr(fq, "_fused_op", refuse)
    z_q, misc = layer(x)
    got = torch.autograd.grad(z_q.sum() + misc["loss"], (x, layer.params.codebook))
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
