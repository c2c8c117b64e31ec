"""`no_vq`: run a model with its vector quantizers turned into identities.

Useful to pre-train an autoencoder without quantization, or to measure what quantization
costs. A VQ layer opts in by holding a boolean attribute `vq_enabled` and returning its input
(with a zero loss) while it is False; `VectorQuantize` does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

_disabled_everywhere = 0


def vq_disabled_everywhere() -> bool:
    """Whether a `no_vq()` without arguments is active (every VQ layer is an identity)."""
    return _disabled_everywhere > 0


@contextlib.contextmanager
def no_vq(*models: nn.Module) -> Iterator[None]:
    """Turn the VQ layers of `models` (all VQ layers when none is given) into identities.

    Inside the block a VQ layer returns its input unchanged and a `misc` dict whose `"loss"`
    is 0; it updates no state. Each layer's previous setting is restored on exit, also after
    an exception, and blocks nest.

    Example:
        >>> with vqfunc.no_vq(model):
        ...     recon = model(x)  # the autoencoder without quantization

    Args:
        models: modules whose VQ submodules (and themselves, if VQ layers) are switched off.
    """
    global _disabled_everywhere
    for model in models:
        if not isinstance(model, nn.Module):
            raise TypeError(f"no_vq: expected nn.Module arguments, got {type(model).__name__}")
    layers = [m for model in models for m in model.modules() if hasattr(m, "vq_enabled")]
    previous = [m.vq_enabled for m in layers]
    if not models:
        _disabled_everywhere += 1
    try:
        for layer in layers:
            setattr(layer, "vq_enabled", False)  # noqa: B010
        yield
    finally:
        for layer, value in zip(layers, previous, strict=True):
            setattr(layer, "vq_enabled", value)  # noqa: B010
        if not models:
            _disabled_everywhere -= 1
