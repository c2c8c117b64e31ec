"""`VQState`: the training state of a quantizer, and its pure step `update_state`.

The state nests one record per stateful technique, each with its `(init, update)` pair, in
the optax style: `VQState(ema=EMAState, replace=ReplaceState)` (`vqfunc.init_ema_state` /
`vqfunc.ema_update`, `vqfunc.init_replace_state` / `vqfunc.replace_dead_codes`). Techniques
that are off hold empty tensors, so the record always has the same fields. A layer keeps each
tensor in a buffer named `<technique>_<field>` (`ema_counts`, `ema_sums`, `replace_counters`,
`replace_usage`); `state_buffers` and `state_from_buffers` translate.

A functional training step threads it explicitly:

    z_q, out = vqfunc.quantize(params, x, cfg, mask=mask)
    ...  # task loss, gradient step on params
    params, state = vqfunc.update_state(params, state, out, cfg, mask=mask, generator=g)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import torch
from torch import Tensor

from vqfunc._config import QuantizerConfig, VQConfig
from vqfunc._ema import (
    EMAState,
    EMAStatistics,
    ema_statistics,
    ema_update,
    init_ema_state,
    reset_codes,
)
from vqfunc._params import AnyParams, VQParams
from vqfunc._quantize import QuantizeOutput, row_weights
from vqfunc._replace import (
    ReplaceRandomness,
    ReplaceState,
    init_replace_state,
    replace_step,
    sample_candidates,
)

if TYPE_CHECKING:
    from vqfunc.distributed import StateSync

S = TypeVar("S", bound=tuple[Any, ...])


class VQState(NamedTuple):
    """Training state of a quantizer (a pytree of tensors), one record per technique.

    Attributes:
        ema: the EMA statistics (`EMAState`: counts `[num_books, K]`, sums
            `[num_books, K, d]`); empty along `K` when `cfg.ema_decay == 0`.
        replace: the dead-code replacement state (`ReplaceState`: LRU counters
            `[num_books, K]` int64 and usage averages `[num_books, K]` float, each
            `[num_books, 0]` unless its rule is on).
    """

    ema: EMAState
    replace: ReplaceState


def init_state(params: VQParams, cfg: VQConfig) -> VQState:
    """The initial state for `params` (on their device): counters at `cfg.replace_freq`, EMA
    statistics of one pseudo-observation per code."""
    return VQState(ema=init_ema_state(params, cfg), replace=init_replace_state(params, cfg))


def state_buffers(state: tuple[Any, ...]) -> dict[str, Tensor]:
    """A nested state's tensors by layer buffer name: `<technique>_<field>`."""
    return {
        f"{technique}_{name}": value
        for technique, record in state._asdict().items()  # type: ignore[attr-defined]
        for name, value in record._asdict().items()
    }


def state_from_buffers(like: S, tensor: Callable[[str, Tensor], Tensor | None]) -> S:
    """A state shaped like `like` whose tensors are `tensor(buffer_name, like_tensor)`."""
    records = {
        technique: type(record)(
            *(tensor(f"{technique}_{name}", value) for name, value in record._asdict().items())
        )
        for technique, record in like._asdict().items()  # type: ignore[attr-defined]
    }
    return type(like)(**records)


def check_state(
    state: object,
    params: AnyParams,
    cfg: QuantizerConfig,
    *,
    where: str,
    kind: type[tuple[Any, ...]] = VQState,
    init: Callable[[Any, Any], tuple[Any, ...]] = init_state,
) -> None:
    """`state` is a `kind` record whose tensors are shaped like `init(params, cfg)`'s, on the
    params' device."""
    if not isinstance(state, kind) or not all(isinstance(r, tuple) for r in state):
        raise TypeError(
            f"{where}: state must be a {kind.__name__} (from init_state(params, cfg) or "
            f"layer.state), got {type(state).__name__}"
        )
    expected = state_buffers(init(params, cfg))
    for buffer, value in state_buffers(state).items():
        technique, name = buffer.split("_", 1)
        shape = tuple(expected[buffer].shape)
        if not isinstance(value, Tensor) or tuple(value.shape) != shape:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"{where}: state.{technique}.{name} is {got}, but cfg ({cfg.describe()}, "
                f"{_replace_setting(cfg)}{_ema_setting(cfg)}) expects shape {shape}"
            )
        if value.device != params.codebook.device:
            raise ValueError(
                f"{where}: state.{technique}.{name} is on {value.device} but params.codebook "
                f"is on {params.codebook.device}"
            )


def _replace_setting(cfg: QuantizerConfig) -> str:
    if cfg.replace_rule == "usage":
        return f"replace_rule='usage', replace_threshold={cfg.replace_threshold}"
    return f"replace_freq={cfg.replace_freq}"


def _ema_setting(cfg: QuantizerConfig) -> str:
    decay = getattr(cfg, "ema_decay", None)
    return "" if decay is None else f", ema_decay={decay}"


def update_state(
    params: VQParams,
    state: VQState,
    out: QuantizeOutput,
    cfg: VQConfig,
    *,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    randomness: ReplaceRandomness | None = None,
    sync: StateSync | None = None,
) -> tuple[VQParams, VQState]:
    """One training step of the stateful techniques that `cfg` turns on.

    First the EMA update (`cfg.ema_decay > 0`) from the batch's assignments, then dead-code
    replacement (`cfg.replaces_codes`: `replace_freq > 0`, or
    `replace_threshold > 0` with `replace_rule="usage"`). Pure, without host syncs: it works under
    `torch.compile` when the replacement randomness is pre-drawn (`randomness=`). With every
    technique off it returns its inputs.

    Args:
        params: the params `out` was computed with.
        state: current state, from `init_state` or a previous step.
        out: `quantize`'s output for the batch.
        cfg: the static configuration.
        mask: the `[*B]` mask given to `quantize`, if any; masked rows neither update the
            statistics nor become replacement candidates. Neither do the rows `quantize` found
            invalid (`out.valid`).
        generator: source of randomness for the replacement candidates.
        randomness: pre-drawn replacement randomness (`draw_replace_randomness`), instead of
            `generator`.
        sync: under data parallelism, `vqfunc.distributed.sync_for(group)`: the batch's
            statistics are summed over the ranks and the replacement candidates shared, so
            that every rank computes the same update. None: no collective.

    Returns:
        New params and state. Gradients do not flow through the update.
    """
    check_state(state, params, cfg, where="update_state")
    # Invalid rows (non-finite; zero-norm with cosine) count as masked.
    mask = row_weights(out.valid, mask, out.z.dtype)
    with torch.no_grad():
        params = VQParams(*(p.detach() for p in params))
        ema, replace = state
        histogram = out.histogram
        if cfg.ema_decay > 0:
            stats = ema_statistics(out.z, out.codes, cfg, mask=mask)
            if sync is not None:
                histogram, counts, sums = sync.reduce_sum(histogram, *stats)
                stats = EMAStatistics(counts, sums)
            params, ema = ema_update(params, ema, stats, cfg)
        if cfg.replaces_codes:
            candidates = sample_candidates(
                out.z, out.codes, cfg, mask=mask, generator=generator, randomness=randomness
            )
            if sync is not None:
                if cfg.ema_decay <= 0:
                    (histogram,) = sync.reduce_sum(histogram)
                candidates = sync.share_candidates(candidates)
            params, replace, replaced = replace_step(params, replace, histogram, candidates, cfg)
            if cfg.ema_decay > 0:
                ema = reset_codes(ema, params, replaced, cfg)
    return params, VQState(ema=ema, replace=replace)
