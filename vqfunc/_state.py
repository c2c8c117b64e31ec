"""`VQState`: the training state of a quantizer, and its pure step `update_state`.

The state gathers what the stateful techniques carry from step to step: dead-code replacement
counters (`vqfunc.replace_dead_codes`) and EMA statistics (`vqfunc.ema_update`). Techniques that
are off hold empty tensors, so the record always has the same fields. The layer shim keeps each
field in a buffer of the same name.

A functional training step threads it explicitly:

    z_q, out = vqfunc.quantize(params, x, cfg, mask=mask)
    ...  # task loss, gradient step on params
    params, state = vqfunc.update_state(params, state, out, cfg, mask=mask, generator=g)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from vqfunc._config import VQConfig
from vqfunc._ema import (
    EMAState,
    EMAStatistics,
    ema_statistics,
    ema_update,
    init_ema_state,
    reset_codes,
)
from vqfunc._params import VQParams
from vqfunc._quantize import QuantizeOutput
from vqfunc._replace import (
    ReplaceRandomness,
    ReplaceState,
    init_replace_state,
    replace_step,
    sample_candidates,
)

if TYPE_CHECKING:
    from vqfunc.distributed import StateSync


class VQState(NamedTuple):
    """Training state of a quantizer (a pytree of tensors).

    Attributes:
        replace_counters: `[num_books, K]` int64 dead-code counters (`ReplaceState.counters`);
            `[num_books, 0]` when `cfg.replace_freq == 0`.
        ema_counts: `[num_books, K]` EMA cluster sizes (`EMAState.counts`);
            `[num_books, 0]` when `cfg.ema_decay == 0`.
        ema_sums: `[num_books, K, d]` EMA sums (`EMAState.sums`); `[num_books, 0, d]` when off.
    """

    replace_counters: Tensor
    ema_counts: Tensor
    ema_sums: Tensor


def init_state(params: VQParams, cfg: VQConfig) -> VQState:
    """The initial state for `params` (on their device): counters at `cfg.replace_freq`, EMA
    statistics of one pseudo-observation per code."""
    replace = init_replace_state(cfg, device=params.codebook.device)
    ema = init_ema_state(params, cfg)
    return VQState(replace.counters, ema.counts, ema.sums)


def check_state(state: object, params: VQParams, cfg: VQConfig, *, where: str) -> None:
    """`state` is a `VQState` shaped as `cfg` says, on the params' device."""
    if not isinstance(state, VQState):
        raise TypeError(
            f"{where}: state must be a VQState (from vqfunc.init_state(params, cfg) or "
            f"layer.state), got {type(state).__name__}"
        )
    described = (
        f"cfg (num_codes={cfg.num_codes}, groups={cfg.groups}, share={cfg.share}, "
        f"replace_freq={cfg.replace_freq}, ema_decay={cfg.ema_decay})"
    )
    check_state_fields(state, init_state_shapes(cfg), params, where=where, described=described)


def check_state_fields(
    state: tuple[object, ...],
    expected: dict[str, tuple[int, ...]],
    params: VQParams,
    *,
    where: str,
    described: str,
) -> None:
    """Each field `name` of `state` is a tensor of shape `expected[name]` on the params' device.

    `described` names the configuration that expects those shapes, for the error message.
    """
    for name, shape in expected.items():
        value = getattr(state, name)
        if not isinstance(value, Tensor) or tuple(value.shape) != shape:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"{where}: state.{name} is {got}, but {described} expects shape {shape}"
            )
        if value.device != params.codebook.device:
            raise ValueError(
                f"{where}: state.{name} is on {value.device} but params.codebook is on "
                f"{params.codebook.device}"
            )


def init_state_shapes(cfg: VQConfig) -> dict[str, tuple[int, ...]]:
    """The shape of each `VQState` field for `cfg`."""
    books, k, d = cfg.num_books, cfg.codes_per_book, cfg.code_dim
    k_replace = k if cfg.replace_freq > 0 else 0
    k_ema = k if cfg.ema_decay > 0 else 0
    return {
        "replace_counters": (books, k_replace),
        "ema_counts": (books, k_ema),
        "ema_sums": (books, k_ema, d),
    }


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
    replacement (`cfg.replace_freq > 0`). Pure, without host syncs: it works under
    `torch.compile` when the replacement randomness is pre-drawn (`randomness=`). With every
    technique off it returns its inputs.

    Args:
        params: the params `out` was computed with.
        state: current state, from `init_state` or a previous step.
        out: `quantize`'s output for the batch.
        cfg: the static configuration.
        mask: the `[*B]` mask given to `quantize`, if any; masked rows neither update the
            statistics nor become replacement candidates.
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
    with torch.no_grad():
        params = VQParams(*(p.detach() for p in params))
        histogram = out.histogram
        if cfg.ema_decay > 0:
            stats = ema_statistics(out.z, out.codes, cfg, mask=mask)
            if sync is not None:
                histogram, counts, sums = sync.reduce_sum(histogram, *stats)
                stats = EMAStatistics(counts, sums)
            params, ema = ema_update(params, EMAState(state.ema_counts, state.ema_sums), stats, cfg)
            state = state._replace(ema_counts=ema.counts, ema_sums=ema.sums)
        if cfg.replace_freq > 0:
            candidates = sample_candidates(
                out.z, out.codes, cfg, mask=mask, generator=generator, randomness=randomness
            )
            if sync is not None:
                if cfg.ema_decay <= 0:
                    (histogram,) = sync.reduce_sum(histogram)
                candidates = sync.share_candidates(candidates)
            params, replace, replaced = replace_step(
                params, ReplaceState(state.replace_counters), histogram, candidates, cfg
            )
            state = state._replace(replace_counters=replace.counters)
            if cfg.ema_decay > 0:
                ema = reset_codes(EMAState(state.ema_counts, state.ema_sums), params, replaced, cfg)
                state = state._replace(ema_counts=ema.counts, ema_sums=ema.sums)
    return params, state
