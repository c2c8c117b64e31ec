"""The training state of residual quantization, `ResidualState`, and its pure step.

Two techniques, in this order, as in `vqfunc.update_state`:

- EMA codebook updates (`cfg.ema_decay > 0`, `vqfunc.ema_update`): each level's codebook is
  the Laplace-smoothed running mean of the residuals assigned to its codes (EnCodec's update);
- dead-code replacement (`vqfunc.replace_dead_codes`).

Each code has a counter, as in `vqfunc.replace_dead_codes`. The residual quantizer's codebooks
are laid out like a grouped quantizer's with one group per level (the same `CodebookLayout`),
so the step reuses `sample_candidates` and the replacement step on that layout, with the
residual each level searched (`r_{i-1}`) as that level's group of vectors:

- shared codebook: a code counts as used when any level picked it, and candidates are drawn
  from the residuals of all levels pooled together;
- separate codebooks: level `i`'s codes are counted, and replaced by its own residuals.

The EMA statistics take the same groups of vectors: pooled over the levels for a shared
codebook, level by level otherwise.

A functional training step:

    z_q, out = vqfunc.residual.quantize(params, x, cfg, mask=mask)
    ...  # task loss, gradient step on params
    params, state = vqfunc.residual.update_state(params, state, out, cfg, mask=mask)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from vqfunc._ema import (
    EMAState,
    EMAStatistics,
    ema_statistics,
    ema_update,
    init_ema_state,
    reset_codes,
)
from vqfunc._params import VQParams
from vqfunc._quantize import row_weights
from vqfunc._replace import (
    ReplaceRandomness,
    ReplaceState,
    init_replace_state,
    replace_step,
    sample_candidates,
)
from vqfunc._state import check_state
from vqfunc._validate import check_config
from vqfunc.residual._config import ResidualConfig
from vqfunc.residual._quantize import ResidualOutput

if TYPE_CHECKING:
    from vqfunc.distributed import StateSync


class ResidualState(NamedTuple):
    """Training state of a residual quantizer (a pytree of tensors).

    Attributes:
        ema: the EMA statistics (`EMAState`: counts `[num_books, K]`, sums
            `[num_books, K, F]`); empty along `K` when `cfg.ema_decay == 0`.
        replace: the dead-code replacement state (`ReplaceState`: LRU counters
            `[num_books, K]` int64, steps left before each code is replaced, and usage
            averages `[num_books, K]` float; each `[num_books, 0]` unless its rule is on).
    """

    ema: EMAState
    replace: ReplaceState


def init_state(params: VQParams, cfg: ResidualConfig) -> ResidualState:
    """The initial state on the params' device: EMA statistics of one pseudo-observation per
    code and counters at `cfg.replace_freq` (each empty when its technique is off)."""
    check_config(cfg, ResidualConfig, where="vqfunc.residual.init_state")
    return ResidualState(ema=init_ema_state(params, cfg), replace=init_replace_state(params, cfg))


def check_residual_state(
    state: object, params: VQParams, cfg: ResidualConfig, *, where: str
) -> None:
    """`state` is a `ResidualState` shaped as `cfg` says, on the params' device."""
    check_state(state, params, cfg, where=where, kind=ResidualState, init=init_state)


def update_state(
    params: VQParams,
    state: ResidualState,
    out: ResidualOutput,
    cfg: ResidualConfig,
    *,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    randomness: ReplaceRandomness | None = None,
    sync: StateSync | None = None,
) -> tuple[VQParams, ResidualState]:
    """One step of the stateful techniques `cfg` turns on, after `quantize`: the EMA update
    (`cfg.ema_decay > 0`), then dead-code replacement (`cfg.replaces_codes`: `replace_freq > 0`, or
    `replace_threshold > 0` with `replace_rule="usage"`).

    Pure, without host syncs. With every technique off it returns its inputs.

    Args:
        params: the params `out` was computed with.
        state: current state, from `vqfunc.residual.init_state` or a previous step.
        out: `vqfunc.residual.quantize`'s output for the batch.
        cfg: the static configuration.
        mask: the `[*B]` mask given to `quantize`, if any; masked rows neither count in the
            statistics nor become candidates.
        generator: source of randomness for the candidates.
        randomness: pre-drawn randomness instead of `generator`, from
            `vqfunc.draw_replace_randomness(num_rows, cfg)` (`num_rows` the number of input
            vectors).
        sync: under data parallelism, `vqfunc.distributed.sync_for(group)`: the histogram and
            the EMA statistics are summed over the ranks and the candidates shared, so every
            rank takes the same step.

    Returns:
        New params (EMA codebooks, dead codes replaced; affine parameters unchanged) and
        state. Gradients do not flow through the update.
    """
    where = "vqfunc.residual.update_state"
    check_config(cfg, ResidualConfig, where=where)
    check_residual_state(state, params, cfg, where=where)
    if not cfg.replaces_codes and cfg.ema_decay <= 0:
        return params, state
    # Rows with a non-finite entry count as masked.
    mask = row_weights(out.valid, mask, out.z.dtype)
    with torch.no_grad():
        params = VQParams(*(p.detach() for p in params))
        ema, replace = state
        # The residual each level searched, as that level's group: `[*B, L * F]`.
        searched = out.residuals[..., : cfg.levels, :].flatten(-2)
        histogram = out.histogram
        if cfg.ema_decay > 0:
            stats = ema_statistics(searched, out.codes, cfg, mask=mask)
            if sync is not None:
                histogram, counts, sums = sync.reduce_sum(histogram, *stats)
                stats = EMAStatistics(counts, sums)
            params, ema = ema_update(params, ema, stats, cfg)
        if cfg.replaces_codes:
            candidates = sample_candidates(
                searched, out.codes, cfg, mask=mask, generator=generator, randomness=randomness
            )
            if sync is not None:
                if cfg.ema_decay <= 0:
                    (histogram,) = sync.reduce_sum(histogram)
                candidates = sync.share_candidates(candidates)
            params, replace, replaced = replace_step(params, replace, histogram, candidates, cfg)
            if cfg.ema_decay > 0:
                ema = reset_codes(ema, params, replaced, cfg)
    return params, ResidualState(ema=ema, replace=replace)
