"""`vqtorch.utils`: find the VQ layers of a model, and switch them off (`no_vq`)."""

from __future__ import annotations

import contextlib
from types import TracebackType

from torch import nn

from vqfunc.nn._no_vq import no_vq as _no_vq_everywhere
from vqfunc.vqtorch.nn.vq_base import _VQBaseLayer

__all__ = ["get_vq_layers", "is_vq", "is_vqn", "no_vq"]


def is_vq(m: nn.Module) -> bool:
    """Whether `m` is a VQ layer (an instance of `vqfunc.vqtorch.nn._VQBaseLayer`)."""
    return isinstance(m, _VQBaseLayer)


def is_vqn(net: nn.Module) -> bool:
    """Whether `net` holds a VQ layer (itself included)."""
    return any(is_vq(layer) for layer in net.modules())


def get_vq_layers(model: nn.Module) -> list[nn.Module]:
    """The VQ layers of `model` (itself included), in `model.modules()` order."""
    return [m for m in model.modules() if is_vq(m)]


class no_vq:
    """Turn VQ layers into identities: `with vqtorch.no_vq(model): out = model(x)`.

    The layers are switched off (`layer.enabled = False`) when the object is made, and each
    gets its previous setting back on exit, also after an exception. A switched-off layer
    returns its (normalised) input and an empty `misc`, and its hooks do nothing.

    Args:
        modules: a module or a list of modules (`nn.DataParallel` wrappers are unwrapped)
            whose VQ layers to switch off. None (vqtorch's README writes `no_vq()`) switches
            off every VQ layer, of this package and of `vqfunc.nn`, for the duration.
            vqfunc's own layers inside `modules` are switched off too.
    """

    def __init__(self, modules: nn.Module | list[nn.Module] | None = None) -> None:
        if modules is None:
            module_list: list[nn.Module] = []
        elif isinstance(modules, list):
            module_list = modules
        else:
            module_list = [modules]
        unwrapped = []
        for module in module_list:
            if isinstance(module, nn.DataParallel):
                module = module.module
            if not isinstance(module, nn.Module):
                raise TypeError(
                    "no_vq: expected an nn.Module or a list of nn.Module, got "
                    f"{type(module).__name__}"
                )
            unwrapped.append(module)
        self.modules = unwrapped
        self._previous = [(m, m.enabled) for module in unwrapped for m in _vq_layers(module)]
        # vqfunc's switch covers vqfunc.nn's layers, and every layer when no module is given.
        self._native: contextlib.AbstractContextManager[None] = _no_vq_everywhere(*unwrapped)
        self._native.__enter__()
        for layer, _ in self._previous:
            layer.enabled = False

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for layer, enabled in reversed(self._previous):
            layer.enabled = enabled
        self._native.__exit__(exception_type, exception_value, traceback)

    def enable_vq(self, module: nn.Module, enable: bool) -> None:
        """Set `enabled` on every VQ layer of `module`."""
        for m in _vq_layers(module):
            m.enabled = enable


def _vq_layers(model: nn.Module) -> list[_VQBaseLayer]:
    return [m for m in model.modules() if isinstance(m, _VQBaseLayer)]
