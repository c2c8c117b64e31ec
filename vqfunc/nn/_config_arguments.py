"""Layer keyword arguments that come from a configuration's fields, declared once.

A layer takes the fields of its configuration (`VQConfig`, `ResidualConfig`, `FSQConfig`,
...: any dataclass of static fields) as keyword arguments with the configuration's own
defaults: `config_from_arguments` builds the configuration from them, and
`with_config_signature` gives the layer's `__init__` the signature that lists them, so that
`help()`, `inspect.signature` and editors show every argument and its default without the
field block being written again in the layer.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")
F = TypeVar("F", bound=Callable[..., None])


def config_fields(cfg_type: type[DataclassInstance]) -> dict[str, dataclasses.Field[Any]]:
    """The configuration's fields by name, in declaration order."""
    if not (isinstance(cfg_type, type) and dataclasses.is_dataclass(cfg_type)):
        raise TypeError(f"expected a dataclass configuration type, got {cfg_type!r}")
    return {f.name: f for f in dataclasses.fields(cfg_type) if f.init}


def config_from_arguments(cfg_type: type[C], owner: str, arguments: dict[str, Any]) -> C:
    """`cfg_type(**arguments)`, with an error naming `owner` for an unknown argument."""
    fields = config_fields(cfg_type)
    unknown = [name for name in arguments if name not in fields]
    if unknown:
        raise TypeError(
            f"{owner}: unexpected keyword argument {unknown[0]!r}; expected the fields of "
            f"{cfg_type.__name__} ({', '.join(fields)}) or the layer's own arguments"
        )
    return cfg_type(**arguments)


def with_config_signature(cfg_type: type[DataclassInstance]) -> Callable[[F], F]:
    """Give a layer's `__init__(self, <positional>, *, <own keyword arguments>, **options)`
    the signature with every field of `cfg_type` (not already a parameter) as a keyword-only
    argument with the field's default, before the layer's own keyword arguments."""

    def decorate(init: F) -> F:
        signature = inspect.signature(init)
        own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        taken = {p.name for p in own}
        leading = [p for p in own if p.kind is not p.KEYWORD_ONLY]
        trailing = [p for p in own if p.kind is p.KEYWORD_ONLY]
        from_config = [
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type
            )
            for name, f in config_fields(cfg_type).items()
            if name not in taken
        ]
        init.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[*leading, *from_config, *trailing]
        )
        return init

    return decorate
