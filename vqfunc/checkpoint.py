"""Checkpoints of params and state: flat dicts of plain tensors, shared by both APIs.

A tree of tensors (`VQParams`, `VQState`, dicts, lists and tuples of them, any pytree that
`optree` flattens) becomes a flat `{"key": tensor}` dict whose keys join the path's field
names, dict keys and list indices with dots (`"codebook"`, `"layers.0.ema_sums"`). Every
tensor is detached, contiguous and owns its storage, so the dict can go to `torch.save` or
`safetensors` as is.

The layer shims name their parameters like the fields of `VQParams` and their buffers
`<technique>_<field>` after the nested state (`ema_counts`, `ema_sums`, `replace_counters`):
`layer_state_dict(params, state)` *is* a `VectorQuantize.state_dict()` (or a
`ResidualVectorQuantize`'s, for a residual state), and `from_layer_state_dict` reads one back,
so a model trained functionally can continue as a layer and the other way round::

    layer.load_state_dict(vqfunc.checkpoint.layer_state_dict(params, state))
    params, state = vqfunc.checkpoint.from_layer_state_dict(layer.state_dict(), layer.cfg)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, TypeVar

import optree
import torch
from torch import Tensor

from vqfunc._config import QuantizerConfig, VQConfig
from vqfunc._params import AnyParams, init_params
from vqfunc._state import VQState, check_state, init_state, state_buffers, state_from_buffers
from vqfunc.residual._config import ResidualConfig
from vqfunc.residual._quantize import init_params as init_residual_params
from vqfunc.residual._state import ResidualState, check_residual_state
from vqfunc.residual._state import init_state as init_residual_state

__all__ = ["flatten", "from_layer_state_dict", "layer_state_dict", "load", "save", "unflatten"]

T = TypeVar("T")

# The layer shim's buffer recording that its k-means warm-up has run.
KMEANS_FLAG = "kmeans_initialized"


def _key(entries: tuple[Any, ...], prefix: str, *, where: str) -> str:
    parts: list[str] = []
    for entry in entries:
        if isinstance(entry, optree.NamedTupleEntry):
            parts.append(str(entry.field))
        elif isinstance(entry, optree.GetAttrEntry):
            parts.append(str(entry.name))
        else:
            parts.append(str(entry.entry))
    key = prefix + ".".join(parts)
    if not key:
        raise ValueError(
            f"{where}: a bare tensor has no name; pass prefix='name' or wrap it, e.g. "
            "{'name': tensor}"
        )
    return key


def _plain(tensor: Tensor) -> Tensor:
    """A detached, contiguous copy that owns its storage."""
    return tensor.detach().clone(memory_format=torch.contiguous_format)


def flatten(tree: Any, *, prefix: str = "") -> dict[str, Tensor]:
    """`tree`'s tensors as a flat dict of dotted keys (fresh, contiguous, unshared copies).

    Args:
        tree: any pytree of tensors (`None` leaves are skipped, as `optree` does).
        prefix: prepended to every key, e.g. `"encoder.vq."`.

    Returns:
        `{key: tensor}` in the tree's flattening order.
    """
    accessors, leaves, _ = optree.tree_flatten_with_accessor(tree)
    flat: dict[str, Tensor] = {}
    for accessor, leaf in zip(accessors, leaves, strict=True):
        key = _key(tuple(accessor), prefix, where="flatten")
        if not isinstance(leaf, Tensor):
            raise TypeError(f"flatten: {key} is a {type(leaf).__name__}, expected a tensor")
        if key in flat:
            raise ValueError(f"flatten: two leaves of the tree share the key {key!r}")
        flat[key] = _plain(leaf)
    return flat


def unflatten(flat: Mapping[str, Tensor], like: T, *, prefix: str = "") -> T:
    """The inverse of `flatten`: a tree shaped like `like`, its tensors read from `flat`.

    Every leaf of `like` must have a tensor of the same shape and dtype under its key; the
    result is on `like`'s devices. Keys of `flat` outside `prefix` are ignored; keys under it
    that `like` does not have are an error.

    Args:
        flat: e.g. from `flatten`, `torch.load` or `safetensors.torch.load_file`.
        like: a tree with the wanted structure, shapes and dtypes (e.g. fresh params).
        prefix: the prefix the keys were written with.

    Returns:
        A new tree; `flat` and `like` are unchanged.
    """
    accessors, leaves, spec = optree.tree_flatten_with_accessor(like)  # type: ignore[arg-type, var-annotated]
    keys = [_key(tuple(a), prefix, where="unflatten") for a in accessors]
    missing = [k for k in keys if k not in flat]
    unexpected = sorted(set(k for k in flat if k.startswith(prefix)) - set(keys))
    if missing or unexpected:
        raise KeyError(
            f"unflatten: keys do not match the tree: missing {missing}, unexpected {unexpected}"
        )
    values = []
    for key, leaf in zip(keys, leaves, strict=True):
        value = flat[key]
        if not isinstance(value, Tensor) or not isinstance(leaf, Tensor):
            raise TypeError(f"unflatten: {key} must be a tensor in both flat and like")
        if value.shape != leaf.shape or value.dtype != leaf.dtype:
            raise ValueError(
                f"unflatten: {key} has shape {tuple(value.shape)} and dtype {value.dtype}, "
                f"expected {tuple(leaf.shape)} and {leaf.dtype}"
            )
        values.append(_plain(value).to(leaf.device))
    return optree.tree_unflatten(spec, values)  # type: ignore[return-value]


def layer_state_dict(
    params: AnyParams,
    state: VQState | ResidualState | None = None,
    *,
    cfg: QuantizerConfig | None = None,
    kmeans_initialized: bool = True,
    prefix: str = "",
) -> dict[str, Tensor]:
    """A layer's `state_dict()` holding functional `params` and `state`.

    Args:
        params: the params.
        state: the training state, a `VQState` (for `VectorQuantize`) or a `ResidualState`
            (for `ResidualVectorQuantize`); default: the initial state for `cfg`.
        cfg: the configuration, to check `state` and to make the default state.
        kmeans_initialized: the value of the layer's k-means flag: True (default) so that a
            layer with `kmeans_init=True` keeps the loaded codebook instead of warming again.
        prefix: the layer's name in its model plus a dot (e.g. `"vq."`).

    Returns:
        Flat dict of fresh tensors, loadable with `layer.load_state_dict`.
    """
    if state is None:
        if cfg is None:
            raise ValueError("layer_state_dict: pass state, or cfg to start from init_state")
        state = _initial_state(params, cfg)
    elif cfg is not None:
        if isinstance(cfg, ResidualConfig):
            check_residual_state(state, params, cfg, where="layer_state_dict")
        else:
            check_state(state, params, cfg, where="layer_state_dict")
    flat = flatten(params, prefix=prefix)
    flat.update({prefix + name: _plain(value) for name, value in state_buffers(state).items()})
    device = params.codebook.device
    flat[prefix + KMEANS_FLAG] = torch.tensor(kmeans_initialized, device=device)
    return flat


def from_layer_state_dict(
    state_dict: Mapping[str, Tensor],
    cfg: QuantizerConfig,
    *,
    prefix: str = "",
    device: torch.device | str | None = None,
) -> tuple[AnyParams, Any]:
    """Functional `(params, state)` read from a layer's `state_dict()` (or a checkpoint).

    Args:
        state_dict: the layer's state dict (or a model's, with `prefix`).
        cfg: the layer's configuration (`layer.cfg`).
        prefix: the layer's name in its model plus a dot.
        device: where to put the tensors (default: where the codebook is stored).

    Returns:
        Fresh `VQParams` (`ResidualParams` with `codebook_dim`) and state (a `VQState` for a
        `VQConfig`, a `ResidualState` for a `ResidualConfig`; copies: later training of the
        layer does not change them). State buffers the dict lacks (saved before the layer had
        them) take their initial values.
    """
    key = prefix + "codebook"
    if key not in state_dict:
        raise KeyError(f"from_layer_state_dict: no {key!r} in the state dict")
    stored = state_dict[key]
    device = stored.device if device is None else torch.device(device)
    if isinstance(cfg, ResidualConfig):
        params_like: AnyParams = init_residual_params(cfg, device=device, dtype=stored.dtype)
    else:
        params_like = init_params(cfg, device=device, dtype=stored.dtype)
    params = type(params_like)(
        *(
            _checked(state_dict, prefix + name, like, "from_layer_state_dict")
            for name, like in params_like._asdict().items()
        )
    )
    # A state buffer missing from the dict (saved before its technique had one) starts afresh,
    # as the layer's own `load_state_dict` does.
    state = state_from_buffers(
        _initial_state(params, cfg),
        lambda name, like: (
            _checked(state_dict, prefix + name, like, "from_layer_state_dict")
            if prefix + name in state_dict
            else like
        ),
    )
    return params, state


def _initial_state(params: AnyParams, cfg: QuantizerConfig) -> VQState | ResidualState:
    if isinstance(cfg, ResidualConfig):
        return init_residual_state(params, cfg)
    if not isinstance(cfg, VQConfig):
        raise TypeError(
            f"checkpoint: cfg must be a VQConfig or a ResidualConfig, got {type(cfg).__name__}"
        )
    return init_state(params, cfg)  # type: ignore[arg-type]  # a VQConfig's are VQParams


def _checked(flat: Mapping[str, Tensor], key: str, like: Tensor, where: str) -> Tensor:
    if key not in flat:
        raise KeyError(f"{where}: no {key!r} in the state dict")
    value = flat[key]
    if value.shape != like.shape or value.dtype != like.dtype:
        raise ValueError(
            f"{where}: {key} has shape {tuple(value.shape)} and dtype {value.dtype}, but the "
            f"configuration expects {tuple(like.shape)} and {like.dtype}"
        )
    return _plain(value).to(like.device)


def save(tree: Any, path: str | os.PathLike[str], *, prefix: str = "") -> None:
    """`torch.save` of `flatten(tree)` (a flat dict of plain tensors)."""
    torch.save(flatten(tree, prefix=prefix), path)


def load(path: str | os.PathLike[str], like: T, *, prefix: str = "") -> T:
    """The tree saved by `save`, shaped like `like` (loaded with `weights_only=True`)."""
    flat = torch.load(path, map_location="cpu", weights_only=True)
    return unflatten(flat, like, prefix=prefix)
