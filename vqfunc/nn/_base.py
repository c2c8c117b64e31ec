"""Plumbing shared by the `nn.Module` shims (`VectorQuantize`, `ResidualVectorQuantize`).

A shim holds the params as `nn.Parameter`s named like the fields of `VQParams` and its
training state as persistent buffers named `<technique>_<field>` after the nested state record
(`ema_counts`, `ema_sums`, `replace_counters`, `replace_usage`); it mutates them only in
training mode and only while they are its own tensors (not those `torch.func.functional_call`
swapped in).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

from vqfunc._affine import effective_codebook
from vqfunc._config import QuantizerConfig
from vqfunc._params import AnyParams, VQParams
from vqfunc._state import state_buffers, state_from_buffers
from vqfunc._warmup import fit_params
from vqfunc.distributed import sync_for
from vqfunc.nn._no_vq import switched_off

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

_PARAM_NAMES = VQParams._fields


class QuantizerShim(nn.Module):
    """Base of the layer shims: params view, own-tensor tracking, k-means flag mirror."""

    cfg: QuantizerConfig
    _vq_switch: bool
    _no_vq_scoped = True  # `vqfunc.no_vq` reaches the layer through the context
    _state_names: tuple[str, ...]

    codebook: nn.Parameter
    affine_scale: nn.Parameter
    affine_bias: nn.Parameter
    kmeans_initialized: Tensor
    process_group: ProcessGroup | None

    def _register_tensors(
        self, params: AnyParams, state: NamedTuple, *, frozen_codebook: bool = False
    ) -> None:
        """Register `params` as parameters, `state`'s tensors and the k-means flag as buffers."""
        for name, value in params._asdict().items():
            # Empty affine parameters (affine off) take no gradient: DistributedDataParallel
            # would otherwise wait for their gradients and fail.
            trainable = value.numel() > 0 and not (frozen_codebook and name == "codebook")
            self.register_parameter(name, nn.Parameter(value, requires_grad=trainable))
        buffers = state_buffers(state)
        for name, value in buffers.items():
            self.register_buffer(name, value)
        self._state_names = tuple(buffers)
        # The state's structure only (no tensors), to view the buffers as a state record.
        self.__dict__["_state_structure"] = state_from_buffers(state, lambda name, value: None)
        self.register_buffer(
            "kmeans_initialized", torch.tensor(False, device=params.codebook.device)
        )
        self.vq_enabled = True
        self._kmeans_done: bool | None = None  # Python mirror of the buffer: no device reads
        self._remember_own_tensors()
        self.register_load_state_dict_post_hook(_after_load)
        self._register_load_state_dict_pre_hook(_fill_missing_state, with_module=True)

    def _initial_state(self, params: VQParams) -> Any:
        """The layer's initial state for `params` (its `init_state`)."""
        raise NotImplementedError

    def _state_view(self) -> Any:
        """The buffers as the nested state record (the layer's own tensors, not copies)."""
        structure = self.__dict__["_state_structure"]
        return state_from_buffers(structure, lambda name, value: getattr(self, name))

    @property
    def vq_enabled(self) -> bool:
        """Whether the layer quantizes: its own switch, unless a `vqfunc.no_vq` block of the
        current thread or task turns it off."""
        return self._quantizing()

    @vq_enabled.setter
    def vq_enabled(self, value: bool) -> None:
        self._vq_switch = bool(value)

    def _quantizing(self) -> bool:
        return self._vq_switch and not switched_off(id(self))

    @property
    def params(self) -> VQParams:
        """The layer's parameters as a `VQParams` (the layer's own tensors, not copies)."""
        return VQParams(self.codebook, self.affine_scale, self.affine_bias)

    # Read-only views of the configuration, for code that inspects any VQ layer.

    @property
    def feature_size(self) -> int:
        """`cfg.feature_size`: size `F` of the quantized axis."""
        return self.cfg.feature_size

    @property
    def num_codes(self) -> int | tuple[int, ...]:
        """`cfg.num_codes`: codes of all codebooks together (or one size per level)."""
        return self.cfg.num_codes

    @property
    def dim(self) -> int:
        """`cfg.dim`: the feature axis of the input."""
        return self.cfg.dim

    @property
    def beta(self) -> float:
        """`cfg.beta`: weight of the codebook term of the commitment loss."""
        return self.cfg.beta

    @torch.no_grad()
    def get_codebook(self) -> Tensor:
        """The codes the search sees (`vqfunc.effective_codebook`: the affine map applied),
        detached, shaped like `codebook` (`cfg.codebook_shape`)."""
        return effective_codebook(self.params, self.cfg).detach()

    @torch.no_grad()
    def load_params(self, params: AnyParams) -> None:
        """Copy `params` into the layer's parameters (shapes must match)."""
        self._copy_params(params)

    def _fit_for_kmeans_init(self, *args: Any, **kwargs: Any) -> Any:
        """The warm-up fit `kmeans_init` runs (`fit_params`; the residual layer fits stacks)."""
        return fit_params(*args, **kwargs)

    @torch.no_grad()
    def _kmeans_warmup(self, x: Tensor, mask: Tensor | None) -> None:
        """`kmeans_init`: fit the codebook to the unmasked vectors of `x` (of every rank, under
        torch.distributed), once. No rank has vectors yet: try again on the next batch."""
        fitted = self._fit_for_kmeans_init(
            self.params,
            x,
            self.cfg,
            method="kmeans",
            generator=None,
            kmeans_iters=20,
            mask=mask,
            sync=sync_for(self.process_group),
            where=f"{type(self).__name__} (kmeans_init)",
        )
        if fitted is None:
            return
        self.load_params(fitted)
        self._mark_kmeans_done()

    @torch.no_grad()
    def _copy_params(self, params: AnyParams) -> None:
        """Copy `params` into the layer's parameters, after checking every shape."""
        where = f"{type(self).__name__}.load_params"
        record = type(self.params)
        if not isinstance(params, record):
            raise TypeError(
                f"{where}: params must be a {record.__name__} (e.g. from "
                f"vqfunc.init_params(layer.cfg) or warmup_params), got {type(params).__name__}"
            )
        own = self.params._asdict()
        for name, value in params._asdict().items():
            if value.shape != own[name].shape:
                raise ValueError(
                    f"{where}: params.{name} has shape {tuple(value.shape)}, expected "
                    f"{tuple(own[name].shape)}"
                )
        for name, value in params._asdict().items():
            own[name].copy_(value)

    @torch.no_grad()
    def _write(self, params: AnyParams | None, state: NamedTuple) -> None:
        if params is not None:
            self.codebook.copy_(params.codebook)
        for name, value in state_buffers(state).items():
            getattr(self, name).copy_(value)

    def _quantize_and_update(
        self,
        quantize_fn: Callable[..., tuple[Tensor, Any]],
        update_fn: Callable[..., tuple[AnyParams, Any]],
        x: Tensor,
        mask: Tensor | None,
        *,
        updates: bool,
        **options: Any,
    ) -> tuple[Tensor, Any]:
        """`quantize_fn(params, x, cfg, mask=, **options)`, then, if `updates`, the state update
        `update_fn(params, state, out, cfg, mask=, sync=)` written into the layer."""
        params = self.params
        if updates:
            # The update below writes the codebook in place; the graph of this forward pass
            # must keep the values it was computed with.
            params = params._replace(codebook=params.codebook.clone())
        z_q, out = quantize_fn(params, x, self.cfg, mask=mask, **options)
        if updates:
            sync = sync_for(self.process_group)
            new_params, new_state = update_fn(
                self.params, self.state, out, self.cfg, mask=mask, sync=sync
            )
            self._write(new_params, new_state)
        return z_q, out

    def _kmeans_initialized(self) -> bool:
        # A Python mirror of the buffer, so that training steps do not read the device.
        if self._kmeans_done is None:
            self._kmeans_done = bool(self.kmeans_initialized)
        return self._kmeans_done

    def _mark_kmeans_done(self) -> None:
        self.kmeans_initialized.fill_(True)
        self._kmeans_done = True

    def _remember_own_tensors(self) -> None:
        # Plain attribute (not a submodule or buffer): the tensors registered right now.
        self.__dict__["_own_tensors"] = self._bound_tensors()

    def _bound_tensors(self) -> tuple[Tensor | None, ...]:
        params = tuple(self._parameters.get(name) for name in _PARAM_NAMES)
        names = (*self._state_names, "kmeans_initialized")
        return params + tuple(self._buffers.get(name) for name in names)

    def _holds_own_tensors(self) -> bool:
        """False while `functional_call` has swapped in other tensors (the pass stays pure)."""
        own = self.__dict__.get("_own_tensors", ())
        bound = self._bound_tensors()
        return len(own) == len(bound) and all(a is b for a, b in zip(own, bound, strict=True))

    def _apply(self, fn: Any, recurse: bool = True) -> QuantizerShim:
        # `.to()`, `.cuda()`, `.double()` may put new tensors in place of the registered ones.
        result = super()._apply(fn, recurse)
        # The params follow a cast, the state keeps at least float32 (`.half()` would turn
        # 70,000-vector EMA sums into infinities within a few steps).
        for name in self._state_names:
            buffer = self._buffers[name]
            if buffer is not None and buffer.is_floating_point():
                self._buffers[name] = buffer.to(torch.promote_types(buffer.dtype, torch.float32))
        self._remember_own_tensors()
        return result


def _after_load(module: nn.Module, incompatible_keys: Any) -> None:
    # `load_state_dict(assign=True)` may bind new tensors, and the k-means flag may change.
    assert isinstance(module, QuantizerShim)
    module._kmeans_done = None
    module._remember_own_tensors()


def _fill_missing_state(
    module: QuantizerShim, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    # State dicts saved before the layer had a technique's buffers (the EMA statistics of
    # residual VQ, the usage averages) hold none of them: start them afresh, from the loaded
    # codebook (counters at `replace_freq`, EMA statistics of one pseudo-observation per code).
    if prefix + "codebook" not in state_dict:
        return
    missing = [name for name in module._state_names if prefix + name not in state_dict]
    if not missing:
        return
    own = module.codebook
    codebook = state_dict[prefix + "codebook"].to(own.device, own.dtype)
    fresh = state_buffers(module._initial_state(module.params._replace(codebook=codebook)))
    for name in missing:
        state_dict[prefix + name] = fresh[name]


def describe(cfg: Any, leading: tuple[str, ...], optional: tuple[str, ...]) -> str:
    """`extra_repr` text: the `leading` fields of `cfg`, then the `optional` ones that are set.

    Strings are quoted; booleans among `optional` appear only when True, as `name=True`.
    """
    parts = [f"{name}={getattr(cfg, name)!r}" for name in leading]
    parts += [f"{name}={getattr(cfg, name)!r}" for name in optional if getattr(cfg, name)]
    return ", ".join(parts)


def misc_with_aliases(out: NamedTuple, **aliases: str) -> dict[str, Any]:
    """vqtorch's `misc` dictionary: `out`'s fields, plus each alias naming one of them."""
    misc: dict[str, Any] = out._asdict()
    for alias, field in aliases.items():
        misc[alias] = misc[field]
    return misc
