"""Grouped residual VQ (HiFi-Codec): channel groups, each with a residual stack of its own.

With `G = cfg.channel_groups > 1`, an input vector of `F` features splits into `G` groups of
`F / G` consecutive channels; group `g` is quantized by its own residual stack, whose config is
`cfg.group_config` (`channel_groups=1`, `feature_size=F / G`, `dim=-1`). The params and the
state are those of the `G` stacks, stacked on a new leading axis (`codebook [G, ...]`, and so
on for every tensor).

`quantize` and `dequantize` are `torch.func.vmap` of the ungrouped functions over that axis
(params `in_dims=0`, the input's groups on the split feature axis). The stateful steps
(`init_state`, `update_state`, the warm-up) run the ungrouped step once per group, in group
order: their collectives (`sync=`), their generator draws and their value checks cannot run
inside `vmap`, and a loop keeps every one of them exactly the ungrouped step (each group's
collectives run in the same order on every rank).

A row with a non-finite entry in any group is invalid in every group (as in plain grouped VQ):
its groups are all searched as zeros, take code 0 and count as masked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor

from vqfunc import _validate
from vqfunc._layout import normalize_dim
from vqfunc._params import ResidualParams, VQParams
from vqfunc._replace import ReplaceRandomness
from vqfunc.residual._config import ResidualConfig

if TYPE_CHECKING:
    from vqfunc.distributed import StateSync
    from vqfunc.residual._quantize import ResidualOutput
    from vqfunc.residual._state import ResidualState

T = TypeVar("T", bound=tuple[Any, ...])

Params = VQParams | ResidualParams


def group_of(record: T, g: int) -> T:
    """Group `g` of a stacked record of tensors (nested records too)."""
    return type(record)(*(group_of(v, g) if isinstance(v, tuple) else v[g] for v in record))


def stack_groups(records: list[T]) -> T:
    """The records of the `G` groups stacked on a new leading axis (nested records too)."""
    first = records[0]
    return type(first)(
        *(
            stack_groups([r[i] for r in records])
            if isinstance(value, tuple)
            else torch.stack([r[i] for r in records])
            for i, value in enumerate(first)
        )
    )


def check_grouped_params(params: object, cfg: ResidualConfig, *, where: str) -> None:
    """`params` stack `cfg.channel_groups` params of `cfg.group_config` on a leading axis."""
    g = cfg.channel_groups
    record = ResidualParams if cfg.codebook_dim is not None else VQParams
    if not isinstance(params, record):
        why = " (cfg.codebook_dim is set)" if record is ResidualParams else ""
        raise TypeError(
            f"{where}: params must be a {record.__name__}{why} (from "
            f"vqfunc.residual.init_params(cfg) or layer.params), got {type(params).__name__}"
        )
    group_cfg = cfg.group_config
    layout = group_cfg.layout
    per_group = {
        "codebook": layout.codebook_shape,
        "affine_scale": layout.affine_shape,
        "affine_bias": layout.affine_shape,
        **group_cfg.projection_shapes,
    }
    for name, shape in per_group.items():
        value = getattr(params, name)
        if not isinstance(value, Tensor):
            raise TypeError(f"{where}: params.{name} must be a tensor, got {type(value).__name__}")
        if tuple(value.shape) != (g, *shape):
            raise ValueError(
                f"{where}: params.{name} has shape {tuple(value.shape)}, but cfg "
                f"(channel_groups={g}, {group_cfg.describe()} per group) expects {(g, *shape)} "
                f"(a leading group axis of size {g})"
            )
    _validate.check_params(
        group_of(params, 0), cfg.group_config, where=f"{where} (group 0)", kind=ResidualConfig
    )


def split_channels(x: Tensor, cfg: ResidualConfig, *, where: str) -> tuple[Tensor, int]:
    """`x` `[..., F (at cfg.dim), ...]` as `[*B, G, F / G]`, and the feature axis.

    Rows with a non-finite entry are NaN in every group (invalid in every group)."""
    dim = _validate.check_input(x, cfg, where=where)
    moved = x.movedim(dim, -1)
    valid = torch.isfinite(moved).all(-1, keepdim=True)
    moved = torch.where(valid, moved, torch.nan)
    g = cfg.channel_groups
    return moved.reshape(*moved.shape[:-1], g, cfg.feature_size // g), dim


def grouped_init_params(init: Callable[..., Params], cfg: ResidualConfig, **options: Any) -> Params:
    """The params of the `G` groups, initialised one after the other (one generator)."""
    group_cfg = cfg.group_config
    return stack_groups([init(group_cfg, **options) for _ in range(cfg.channel_groups)])


def grouped_quantize(
    quantize: Callable[..., tuple[Tensor, ResidualOutput]],
    params: Params,
    x: Tensor,
    cfg: ResidualConfig,
    *,
    mask: Tensor | None,
    n_levels: int | None,
    depth: Tensor | None,
    where: str,
) -> tuple[Tensor, ResidualOutput]:
    """`quantize` of every group, by `vmap` over the group axis; see the module."""
    from vqfunc.residual._levels import check_depth

    check_grouped_params(params, cfg, where=where)
    _validate.check_same_device(x, params, where=where)
    n = cfg.check_n_levels(n_levels, where=where)
    groups, dim = split_channels(x, cfg, where=where)
    batch = tuple(groups.shape[:-2])
    if mask is not None:
        _validate.check_mask(mask, batch, x, where=where)
    if depth is not None:
        depth = check_depth(depth, batch, n, where=where).to(x.device)
    group_cfg = cfg.group_config

    def one_group(p: Params, xs: Tensor) -> tuple[Tensor, ResidualOutput]:
        return quantize(p, xs, group_cfg, mask=mask, n_levels=n, depth=depth)

    z_q, out = torch.func.vmap(one_group, in_dims=(0, -2), out_dims=0)(params, groups)

    def channels(t: Tensor) -> Tensor:  # [G, *B, F / G] -> [*B, F]
        return t.movedim(0, -2).reshape(*batch, cfg.feature_size)

    out = out._replace(
        codes=out.codes.movedim(0, -2),
        distances=out.distances.movedim(0, -2),
        loss=out.loss.mean(),
        z=channels(out.z),
        codewords=channels(out.codewords),
        residuals=out.residuals.movedim(0, -3),
        perplexity=out.perplexity.mean(),
        valid=out.valid[0],
        num_invalid=out.num_invalid[0],
        depth=out.depth[0],
    )
    return channels(z_q).movedim(-1, dim), out


def grouped_dequantize(
    dequantize: Callable[..., Tensor],
    params: Params,
    codes: Tensor,
    cfg: ResidualConfig,
    *,
    n_levels: int | None,
    where: str,
) -> Tensor:
    """`dequantize` of every group's codes `[*B, G, n]`, by `vmap` over the group axis."""
    from vqfunc.residual._levels import check_level_codes

    check_grouped_params(params, cfg, where=where)
    g = cfg.channel_groups
    if isinstance(codes, Tensor) and (codes.ndim < 2 or codes.shape[-2] != g):
        raise ValueError(
            f"{where}: codes must be [*B, channel_groups={g}, levels] (one code per group and "
            f"level), got shape {tuple(codes.shape)}"
        )
    codes, n = check_level_codes(codes, cfg.group_config, n_levels, where=where)
    if codes.device != params.codebook.device:
        raise ValueError(
            f"{where}: codes are on {codes.device} but params.codebook is on "
            f"{params.codebook.device}"
        )
    batch = tuple(codes.shape[:-2])
    dim = normalize_dim(cfg.dim, len(batch) + 1, where=where, name="cfg.dim")
    group_cfg = cfg.group_config

    def one_group(p: Params, c: Tensor) -> Tensor:
        return dequantize(p, c, group_cfg, n_levels=n)

    values = torch.func.vmap(one_group, in_dims=(0, -2), out_dims=0)(params, codes)
    return values.movedim(0, -2).reshape(*batch, cfg.feature_size).movedim(-1, dim)


def output_of_group(out: ResidualOutput, cfg: ResidualConfig, g: int) -> ResidualOutput:
    """Group `g`'s part of a grouped `ResidualOutput`, as its ungrouped quantizer returns it
    (the histogram and the codes of that group; `loss` and `perplexity` are the grouped ones)."""
    d = cfg.feature_size // cfg.channel_groups
    return out._replace(
        codes=out.codes[..., g, :],
        distances=out.distances[..., g, :],
        z=out.z[..., g * d : (g + 1) * d],
        codewords=out.codewords[..., g * d : (g + 1) * d],
        residuals=out.residuals[..., g, :, :],
        histogram=out.histogram[g],
    )


def grouped_update_state(
    update: Callable[..., tuple[Params, ResidualState]],
    params: Params,
    state: ResidualState,
    out: ResidualOutput,
    cfg: ResidualConfig,
    *,
    mask: Tensor | None,
    generator: torch.Generator | None,
    randomness: ReplaceRandomness | None,
    sync: StateSync | None,
) -> tuple[Params, ResidualState]:
    """The ungrouped `update_state` of each group in turn (see the module), stacked.

    `randomness`, if given, holds each group's draw on a leading group axis."""
    where = "vqfunc.residual.update_state"
    g = cfg.channel_groups
    if randomness is not None and not _stacked(randomness, g):
        raise ValueError(
            f"{where}: with channel_groups={g}, randomness must be a ReplaceRandomness "
            f"whose tensors stack each group's draw on a leading axis of size {g} "
            "(torch.stack of vqfunc.draw_replace_randomness(num_rows, cfg.group_config))"
        )
    group_cfg = cfg.group_config
    results = [
        update(
            group_of(params, i),
            group_of(state, i),
            output_of_group(out, cfg, i),
            group_cfg,
            mask=mask,
            generator=generator,
            randomness=None if randomness is None else group_of(randomness, i),
            sync=sync,
        )
        for i in range(g)
    ]
    return stack_groups([p for p, _ in results]), stack_groups([s for _, s in results])


def _stacked(randomness: object, g: int) -> bool:
    """Whether `randomness` is a `ReplaceRandomness` of tensors with a leading axis `g` before
    one group's `keys [num_books, N]` and `noise [num_books, K, d]`."""
    if not isinstance(randomness, ReplaceRandomness):
        return False
    ranks = (3, 4)  # keys, noise: one axis more than a group's draw
    return all(
        isinstance(t, Tensor) and t.ndim == rank and t.shape[0] == g
        for t, rank in zip(randomness, ranks, strict=True)
    )


def grouped_fit(
    fit: Callable[..., Params | None],
    params: Params,
    x: Tensor,
    cfg: ResidualConfig,
    *,
    mask: Tensor | None,
    where: str,
    **options: Any,
) -> Params | None:
    """`fit` (the warm-up of one stack) of each group in turn on its channels; None when no
    group had data (the groups share their valid rows, so all or none do)."""
    check_grouped_params(params, cfg, where=where)
    _validate.check_same_device(x, params, where=where)
    groups, _ = split_channels(x.detach(), cfg, where=where)
    group_cfg = cfg.group_config
    fitted = [
        fit(group_of(params, i), groups[..., i, :], group_cfg, mask=mask, where=where, **options)
        for i in range(cfg.channel_groups)
    ]
    present = [f for f in fitted if f is not None]
    if len(present) < len(fitted):
        return None
    return stack_groups(present)
