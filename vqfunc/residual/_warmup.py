"""`vqfunc.residual.warmup_params`: residual codebooks fitted to data, level after level."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vqfunc._params import AnyParams, ResidualParams, VQParams
from vqfunc._search import nearest_codes
from vqfunc._validate import check_config
from vqfunc._warmup import WarmupMethod, fit_codes, fit_params
from vqfunc.residual._config import ResidualConfig
from vqfunc.residual._grouped import grouped_fit
from vqfunc.residual._projected import project_in, project_out, search

if TYPE_CHECKING:
    from vqfunc.distributed import WarmupSync


def warmup_params(
    params: VQParams | ResidualParams,
    x: Tensor,
    cfg: ResidualConfig,
    *,
    method: WarmupMethod = "data",
    generator: torch.Generator | None = None,
    kmeans_iters: int = 20,
    mask: Tensor | None = None,
    sync: WarmupSync | None = None,
) -> VQParams | ResidualParams:
    """New params whose codebooks are fitted to the vectors of `x`, level after level.

    Level `i` is fitted (with `vqfunc.warmup_params`'s `method`) to the residuals that the
    already fitted levels `1 .. i-1` leave. With a shared codebook, the levels are first fitted
    one by one as above, and the shared codebook is then fitted once to the residuals of all
    levels pooled together.

    Args:
        params: current params; affine parameters are kept (the effective codes fit the data).
        x: `[..., F (at cfg.dim), ...]` data, laid out as `vqfunc.residual.quantize` takes it;
            vectors with a non-finite entry are left out, as if masked.
        cfg: the static configuration.
        method: `"data"` or `"kmeans"` (see `vqfunc.warmup_params`).
        generator: source of randomness; the same seed gives the same codebooks.
        kmeans_iters: Lloyd iterations for `"kmeans"`.
        mask: optional `[*B]` mask over `x`'s non-feature axes; rows at 0 are left out.
        sync: under data parallelism, `vqfunc.distributed.sync_for(group)`: fitted on the
            first rank from the vectors of every rank and broadcast. None: this process only.

    Returns:
        `VQParams` with new codebooks (same shapes, dtype and device); `params` is unchanged.

    Raises:
        ValueError: when no finite, unmasked vector is left (on any rank).
    """
    where = "vqfunc.residual.warmup_params"
    fitted = fit_stacks(
        params,
        x,
        cfg,
        method=method,
        generator=generator,
        kmeans_iters=kmeans_iters,
        mask=mask,
        sync=sync,
        where=where,
    )
    if fitted is None:
        raise ValueError(
            f"{where}: x holds no vectors (shape {tuple(x.shape)}) once the non-finite and "
            "masked ones are left out; expected at least one"
        )
    return fitted


def fit_stacks(
    params: VQParams | ResidualParams,
    x: Tensor,
    cfg: ResidualConfig,
    *,
    mask: Tensor | None,
    where: str,
    **options: Any,
) -> VQParams | ResidualParams | None:
    """`fit_params` of the residual stack, or of each group's stack in turn on its channels
    (`cfg.channel_groups > 1`); None when no vector is left (on any rank)."""
    check_config(cfg, ResidualConfig, where=where)
    if cfg.channel_groups > 1:
        return grouped_fit(fit_params, params, x, cfg, mask=mask, where=where, **options)
    return fit_params(params, x, cfg, mask=mask, where=where, **options)


def fit_levels(
    params: AnyParams,
    rows: Tensor,
    cfg: ResidualConfig,
    method: WarmupMethod,
    generator: torch.Generator | None,
    kmeans_iters: int,
) -> Tensor:
    """Effective codes of shape `cfg.codebook_shape` fitted to finite rows `[M, F]`.

    With per-level sizes, level `i` fits `cfg.level_sizes[i]` codes and the padding rows of its
    storage are zeros (they are never searched). With projections (`ResidualParams`), level `i`
    fits its codes to the projected residuals `r @ W_in + b_in` and subtracts the projected code.
    """
    residual, pooled, fitted = rows, [], []
    k = cfg.codes_per_book
    for level, size in enumerate(cfg.level_sizes):
        if isinstance(params, ResidualParams):
            e = project_in(params, residual, level)
            level_codes = fit_codes(e, size, cfg, method, generator, kmeans_iters)
            codes, _ = search(e, level_codes, cfg)
            pooled.append(e)
            step = project_out(params, level_codes[codes], level)
        else:
            level_codes = fit_codes(residual, size, cfg, method, generator, kmeans_iters)
            codes, _ = nearest_codes(residual, level_codes)
            pooled.append(residual)
            step = level_codes[codes]
        padding = level_codes.new_zeros(k - size, level_codes.shape[-1])
        fitted.append(torch.cat([level_codes, padding]))
        residual = residual - step
    if cfg.share:
        return fit_codes(torch.cat(pooled), k, cfg, method, generator, kmeans_iters)
    return torch.stack(fitted)
