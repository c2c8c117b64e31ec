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
from vqfunc._params import ResidualParams, VQParams
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
from vqfunc.residual._grouped import (
    check_grouped_params,
    group_of,
    grouped_update_state,
    stack_groups,
)
from vqfunc.residual._levels import padding_slots
from vqfunc.residual._projected import search_vectors
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


def init_state(params: VQParams | ResidualParams, cfg: ResidualConfig) -> ResidualState:
    """The initial state on the params' device: EMA statistics of one pseudo-observation per
    code and counters at `cfg.replace_freq` (each empty when its technique is off)."""
    check_config(cfg, ResidualConfig, where="vqfunc.residual.init_state")
    if cfg.channel_groups > 1:
        group_cfg = cfg.group_config
        return stack_groups(
            [init_state(group_of(params, g), group_cfg) for g in range(cfg.channel_groups)]
        )
    return ResidualState(
        ema=init_ema_state(params, cfg),  # type: ignore[arg-type]
        replace=init_replace_state(params, cfg),  # type: ignore[arg-type]
    )


def check_residual_state(
    state: object, params: VQParams | ResidualParams, cfg: ResidualConfig, *, where: str
) -> None:
    """`state` is a `ResidualState` shaped as `cfg` says, on the params' device."""
    if cfg.channel_groups > 1:
        check_grouped_params(params, cfg, where=where)
    check_state(state, params, cfg, where=where, kind=ResidualState, init=init_state)


def update_state(
    params: VQParams | ResidualParams,
    state: ResidualState,
    out: ResidualOutput,
    cfg: ResidualConfig,
    *,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    randomness: ReplaceRandomness | None = None,
    sync: StateSync | None = None,
) -> tuple[VQParams | ResidualParams, ResidualState]:
    """One step of the stateful techniques `cfg` turns on, after `quantize`: the EMA update
    (`cfg.ema_decay > 0`), then dead-code replacement (`cfg.replaces_codes`: `replace_freq > 0`, or
    `replace_threshold > 0` with `replace_rule="usage"`). Only the levels a row reached (its
    `depth`, `n_levels`) count for that level; a level no row reached takes no step.

    Pure, without host syncs. With every technique off it returns its inputs. With
    `cfg.channel_groups > 1` each group's stack takes this step in turn (its own EMA, counters
    and candidates; `sync` then reduces once per group).

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
            vectors); with `cfg.channel_groups = G > 1`, `G` draws for `cfg.group_config`
            stacked on a leading axis.
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
    if cfg.channel_groups > 1:
        return grouped_update_state(
            update_state,
            params,
            state,
            out,
            cfg,
            mask=mask,
            generator=generator,
            randomness=randomness,
            sync=sync,
        )
    # Rows with a non-finite entry count as masked.
    mask = row_weights(out.valid, mask, out.z.dtype)
    with torch.no_grad():
        params = type(params)(*(p.detach() for p in params))
        ema, replace = state
        searched, codes = all_levels(out, cfg)
        if isinstance(params, ResidualParams):
            searched = search_vectors(params, searched.to(params.proj_in.dtype))
        histogram, reached = out.histogram, levels_reached(out, cfg)
        new_params = params
        if cfg.ema_decay > 0:
            weights = level_weights(out, cfg, mask)
            stats = ema_statistics(searched.flatten(-2), codes, cfg, mask=weights)
            if sync is not None:
                histogram, reached, counts, sums = sync.reduce_sum(histogram, reached, *stats)
                stats = EMAStatistics(counts, sums)
            new_params, ema = ema_update(new_params, ema, stats, cfg)  # type: ignore[arg-type]
        elif sync is not None:
            histogram, reached = sync.reduce_sum(histogram, reached)
        if cfg.replaces_codes:
            candidates = sample_candidates(
                searched.flatten(-2),
                codes,
                cfg,
                mask=mask,
                generator=generator,
                randomness=randomness,
            )
            if sync is not None:
                candidates = sync.share_candidates(candidates)
            # The padding of per-level sizes counts as used: never replaced.
            histogram = histogram.masked_fill(padding_slots(cfg, histogram.device), 1.0)
            new_params, replace, replaced = replace_step(
                new_params,  # type: ignore[arg-type]
                replace,
                histogram,
                candidates,
                cfg,
            )
            if cfg.ema_decay > 0:
                ema = reset_codes(ema, new_params, replaced, cfg)
        if not cfg.share:
            # A level that no row reached (fewer levels, or dropped) takes no step.
            # An empty batch (on every rank) counts down every level, as without levels.
            ran = ((reached[:-1] > 0) | (reached[-1] == 0)).view(-1, 1)
            ran = ran & (torch.arange(cfg.levels, device=ran.device) < out.codes.shape[-1]).view(
                -1, 1
            )
            pairs = zip(replace, state.replace, strict=True)
            replace = ReplaceState(*(torch.where(ran, new, old) for new, old in pairs))
            ema = EMAState(
                *(
                    torch.where(ran.view(-1, *([1] * (new.dim() - 1))), new, old)
                    for new, old in zip(ema, state.ema, strict=True)
                )
            )
            codebook = torch.where(ran.unsqueeze(-1), new_params.codebook, params.codebook)
            new_params = new_params._replace(codebook=codebook)
    return new_params, ResidualState(ema=ema, replace=replace)


def level_weights(out: ResidualOutput, cfg: ResidualConfig, mask: Tensor | None) -> Tensor:
    """`[*B, L]` weight of each row at each level: its mask weight where the level ran for it
    (`level < depth`), else 0."""
    depth = out.depth.unsqueeze(-1)
    reached = (torch.arange(cfg.levels, device=depth.device) < depth).to(out.z.dtype)
    if mask is None:
        return reached
    return reached * mask.to(out.z.dtype).unsqueeze(-1)


def all_levels(out: ResidualOutput, cfg: ResidualConfig) -> tuple[Tensor, Tensor]:
    """The residual each level searched `[*B, L, F]` and the codes `[*B, L]`, with the levels
    that did not run (`n_levels < L`) filled with the last residual and code 0."""
    n = out.codes.shape[-1]
    searched = out.residuals[..., :n, :]
    codes = out.codes
    if n < cfg.levels:
        missing = cfg.levels - n
        last = out.residuals[..., n : n + 1, :]
        searched = torch.cat([searched, last.expand(*last.shape[:-2], missing, -1)], -2)
        codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], missing)], -1)
    return searched, codes


def levels_reached(out: ResidualOutput, cfg: ResidualConfig) -> Tensor:
    """`[L + 1]` float32: how many rows reached each level (`depth > level`), then the number
    of rows."""
    depth = out.depth.reshape(-1, 1)
    levels = torch.arange(cfg.levels, device=depth.device)
    reached = (depth > levels).sum(0)
    total = reached.new_full((1,), depth.shape[0])
    return torch.cat([reached, total]).to(torch.float32)
