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
    with _Dispatch():
        assert modes_active() and not plain_eager(x)
    with _Function():
        assert modes_active() and not plain_eager(x)
    seen = torch.func.vmap(lambda t: torch.tensor(float(plain_eager(t))))(torch.zeros(2, 3))
    assert not seen.any()
    compiled = torch.compile(lambda t: t + float(traced_or_transformed()), backend="eager")
    assert torch.equal(compiled(torch.zeros(1)), torch.ones(1))
