"""`no_vq`: run a model with its vector quantizers turned into identities.

Useful to pre-train an autoencoder without quantization, or to measure what quantization
costs. The switch is scoped to the running thread and `asyncio` task (a context variable): a
`no_vq` block in one thread leaves the same layers quantizing in another. vqfunc's layers
(a class attribute `_no_vq_scoped = True`) ask `switched_off(id(self))`; another VQ layer opts
in by holding a boolean attribute `vq_enabled` and returning its input (with a zero loss) while
it is False, which `no_vq(model)` sets for the duration of the block.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn


class _Scope(NamedTuple):
    everywhere: bool
    layers: frozenset[int]  # ids of the layers switched off in this context


_scope: contextvars.ContextVar[_Scope] = contextvars.ContextVar(
    "vqfunc_no_vq",
    default=_Scope(False, frozenset()),  # noqa: B039 (a tuple of a bool and a frozenset: immutable)
)


@torch.compiler.assume_constant_result
def switched_off(layer_id: int) -> bool:
    """Whether a `no_vq` block of the current thread or task switches the layer with this
    `id` off. `torch.compile`, which cannot trace a context variable, reads it once per trace:
    a compiled model keeps the setting it was compiled under."""
    scope = _scope.get()
    return scope.everywhere or layer_id in scope.layers


@contextlib.contextmanager
def no_vq(*models: nn.Module) -> Iterator[None]:
    """Turn the VQ layers of `models` (all VQ layers when none is given) into identities.

    Inside the block a VQ layer returns its input unchanged and a `misc` dict whose `"loss"`
    is 0; it updates no state. Blocks nest, and everything is restored on exit, also after an
    exception. The block applies to the current thread (or `asyncio` task) only.

    Example:
        >>> with vqfunc.no_vq(model):
        ...     recon = model(x)  # the autoencoder without quantization

    Args:
        models: modules whose VQ submodules (and themselves, if VQ layers) are switched off.
    """
    for model in models:
        if not isinstance(model, nn.Module):
            raise TypeError(f"no_vq: expected nn.Module arguments, got {type(model).__name__}")
    layers = [m for model in models for m in model.modules() if hasattr(m, "vq_enabled")]
    # vqfunc's layers consult the context (`switched_off`); others get their attribute set.
    scoped = {id(m) for m in layers if getattr(type(m), "_no_vq_scoped", False)}
    others = [m for m in layers if not getattr(type(m), "_no_vq_scoped", False)]
    previous = [m.vq_enabled for m in others]
    scope = _scope.get()
    token = _scope.set(_Scope(scope.everywhere or not models, scope.layers | scoped))
    try:
        for layer in others:
            setattr(layer, "vq_enabled", False)  # noqa: B010
        yield
    finally:
        for layer, value in zip(others, previous, strict=True):
            setattr(layer, "vq_enabled", value)  # noqa: B010
        _scope.reset(token)
