"""Whether a call runs under a `torch.func` transform or `torch.compile`'s tracer.

vqfunc's operators are registered custom operators (with vmap rules, fake implementations and
autograd formulas), some wrapped in an `autograd.Function` for the `torch.func` transforms.
That machinery serves the transforms and the tracer; a plain eager call pays for it (a custom
operator's dispatch, a Function's argument binding by signature) and needs none of it. Call
sites ask these two questions to take the direct route where they may.
"""

from __future__ import annotations

import torch
from torch.utils import _python_dispatch


def transforms_active() -> bool:
    """Whether a `torch.func` transform (`vmap`, `grad`, `vjp`, ...) is active (True when this
    torch cannot say)."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return active is None or bool(active())


def traced_or_transformed() -> bool:
    """Whether `torch.compile` traces this call or a `torch.func` transform is active."""
    return torch.compiler.is_compiling() or transforms_active()


def transformed_not_traced() -> bool:
    """Whether a `torch.func` transform is active outside `torch.compile`'s tracer: where a
    backward formula must call the transform Function (the tracer does not take an
    autograd.Function nested in another's backward, and plain eager calls need neither)."""
    return not torch.compiler.is_compiling() and transforms_active()


def modes_active() -> bool:
    """Whether a `TorchDispatchMode` or `TorchFunctionMode` is active (a fake-tensor mode, a
    flop counter, a debugging mode): they are there to see every operator (True when this torch
    cannot say)."""
    current = getattr(_python_dispatch, "_get_current_dispatch_mode", None)
    functions = getattr(torch._C, "_is_torch_function_mode_enabled", None)
    if current is None or functions is None:
        return True
    return current() is not None or bool(functions())


# `nn.Parameter` is a subclass in name only (its `__torch_function__` is turned off): a layer's
# codebook reaches the kernels as one, and takes the direct route like a plain tensor.
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def plain_eager(*tensors: torch.Tensor) -> bool:
    """Whether a call on `tensors` may skip the registered operator: neither traced nor
    transformed, no dispatch or function mode active, and every tensor a plain `torch.Tensor`
    or `nn.Parameter` (not a fake or other subclass that the operator's registrations exist
    for)."""
    return (
        not traced_or_transformed()
        and all(type(t) in _PLAIN_TYPES for t in tensors)
        and not modes_active()
    )
