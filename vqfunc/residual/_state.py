"""Dead-code replacement for residual quantization: `ResidualState` and its pure step.

Each code has a counter, as in `vqfunc.replace_dead_codes`. The residual quantizer's codebooks
are laid out like a grouped quantizer's with one group per level (the same `CodebookLayout`),
so the step reuses `sample_candidates` and the replacement step on that layout, with the
residual each level searched (`r_{i-1}`) as that level's group of vectors:

- shared codebook: a code counts as used when any level picked it, and candidates are drawn
  from the residuals of all levels pooled together;
- separate codebooks: level `i`'s codes are counted, and replaced by its own residuals.

A functional training step:

    z_q, out = vqfunc.residual.quantize(params, x, cfg, mask=mask)
    ...  # task loss, gradient step on params
    params, state = vqfunc.residual.update_state(params, state, out, cfg, mask=mask)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

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
from vqfunc.residual._levels import padding_slots
from vqfunc.residual._projected import search_vectors
from vqfunc.residual._quantize import ResidualOutput

if TYPE_CHECKING:
    from vqfunc.distributed import StateSync


class ResidualState(NamedTuple):
    """Training state of a residual quantizer (a pytree of tensors).

    Attributes:
        replace: the dead-code counters (`ReplaceState`: counters `[num_books, K]` int64,
            steps left before each code is replaced); `[num_books, 0]` when
            `cfg.replace_freq == 0`.
    """

    replace: ReplaceState


def init_state(params: VQParams | ResidualParams, cfg: ResidualConfig) -> ResidualState:
    """Counters at `cfg.replace_freq`, on the params' device (empty when replacement is off)."""
    check_config(cfg, ResidualConfig, where="vqfunc.residual.init_state")
    return ResidualState(replace=init_replace_state(params, cfg))  # type: ignore[arg-type]


def check_residual_state(
    state: object, params: VQParams | ResidualParams, cfg: ResidualConfig, *, where: str
) -> None:
    """`state` is a `ResidualState` shaped as `cfg` says, on the params' device."""
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
    """One step of dead-code replacement (`cfg.replace_freq > 0`) after `quantize`.

    Pure, without host syncs. With replacement off it returns its inputs.

    Args:
        params: the params `out` was computed with.
        state: current state, from `vqfunc.residual.init_state` or a previous step.
        out: `vqfunc.residual.quantize`'s output for the batch.
        cfg: the static configuration.
        mask: the `[*B]` mask given to `quantize`, if any; masked rows neither count as uses
            nor become candidates.
        generator: source of randomness for the candidates.
        randomness: pre-drawn randomness instead of `generator`, from
            `vqfunc.draw_replace_randomness(num_rows, cfg)` (`num_rows` the number of input
            vectors).
        sync: under data parallelism, `vqfunc.distributed.sync_for(group)`: the histogram is
            summed over the ranks and the candidates shared, so every rank takes the same step.

    Returns:
        New params (dead codes replaced; affine parameters unchanged) and state. Gradients do
        not flow through the update.
    """
    where = "vqfunc.residual.update_state"
    check_config(cfg, ResidualConfig, where=where)
    check_residual_state(state, params, cfg, where=where)
    if cfg.replace_freq <= 0:
        return params, state
    # Rows with a non-finite entry count as masked.
    mask = row_weights(out.valid, mask, out.z.dtype)
    with torch.no_grad():
        params = type(params)(*(p.detach() for p in params))
        searched, codes = all_levels(out, cfg)
        if isinstance(params, ResidualParams):
            searched = search_vectors(params, searched.to(params.proj_in.dtype))
        candidates = sample_candidates(
            searched.flatten(-2), codes, cfg, mask=mask, generator=generator, randomness=randomness
        )
        histogram, reached = out.histogram, levels_reached(out, cfg)
        if sync is not None:
            histogram, reached = sync.reduce_sum(histogram, reached)
            candidates = sync.share_candidates(candidates)
        # The padding of per-level sizes counts as used: never replaced.
        histogram = histogram.masked_fill(padding_slots(cfg, histogram.device), 1.0)
        new_params, replace, _ = replace_step(
            params,  # type: ignore[arg-type]
            state.replace,
            histogram,
            candidates,
            cfg,
        )
        if not cfg.share:
            # A level that no row reached (fewer levels, or dropped) takes no step.
            # An empty batch (on every rank) counts down every level, as without levels.
            ran = ((reached[:-1] > 0) | (reached[-1] == 0)).view(-1, 1)
            ran = ran & (torch.arange(cfg.levels, device=ran.device) < out.codes.shape[-1]).view(
                -1, 1
            )
            replace = ReplaceState(torch.where(ran, replace.counters, state.replace.counters))
            codebook = torch.where(ran.unsqueeze(-1), new_params.codebook, params.codebook)
            new_params = new_params._replace(codebook=codebook)
    return new_params, ResidualState(replace=replace)


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
