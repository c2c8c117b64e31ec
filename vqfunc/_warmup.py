"""`warmup_params`: codebooks initialised from data, in one process or across ranks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from vqfunc import _validate
from vqfunc._affine import invert_affine
from vqfunc._config import QuantizerConfig, VQConfig
from vqfunc._kmeans import _sample_indices, kmeans
from vqfunc._params import AnyParams, VQParams
from vqfunc._quantize import compute_dtype
from vqfunc._validity import valid_rows

if TYPE_CHECKING:
    from vqfunc.distributed import WarmupSync

WarmupMethod = Literal["data", "kmeans"]
_METHODS = ("data", "kmeans")

# Relative size of the noise added to duplicated vectors when there are fewer vectors than codes.
_DUPLICATE_NOISE = 1e-2


def sample_codes(data: Tensor, k: int, *, generator: torch.Generator | None = None) -> Tensor:
    """`k` codes drawn from the rows of `data` `[M, d]`.

    Uniformly without replacement when `M >= k`. Otherwise every row is used once and the
    remaining `k - M` codes are rows drawn with replacement plus Gaussian noise of
    `1e-2 x` the data's root-mean-square, so that no two codes coincide.
    """
    m = data.shape[0]
    if m >= k:
        return data[_sample_indices(k, m, generator, data.device)]
    gen_device = generator.device if generator is not None else data.device
    extra = torch.randint(m, (k - m,), generator=generator, device=gen_device).to(data.device)
    rms = data.square().mean().sqrt().clamp_min(1e-6)
    noise = torch.randn(k - m, data.shape[1], generator=generator, device=gen_device)
    noisy = data[extra] + _DUPLICATE_NOISE * rms * noise.to(data.device, data.dtype)
    return torch.cat([data, noisy])


def fit_codes(
    data: Tensor,
    k: int,
    cfg: QuantizerConfig,
    method: WarmupMethod,
    generator: torch.Generator | None,
    kmeans_iters: int,
) -> Tensor:
    """`k` codes fitted to the rows of `data` `[M, d]` by `method`."""
    if method == "kmeans" and data.shape[0] >= k:
        spherical = _is_cosine(cfg)
        return kmeans(data, k, iters=kmeans_iters, spherical=spherical, generator=generator)
    return sample_codes(data, k, generator=generator)


def warmup_params(
    params: VQParams,
    x: Tensor,
    cfg: VQConfig,
    *,
    method: WarmupMethod = "data",
    generator: torch.Generator | None = None,
    kmeans_iters: int = 20,
    mask: Tensor | None = None,
    sync: WarmupSync | None = None,
) -> VQParams:
    """New params whose codebook is fitted to the vectors of `x`.

    Args:
        params: current params; only the codebook is replaced (affine parameters are kept,
            and the raw codes are chosen so that the *effective* codes fit the data).
        x: `[..., F (at cfg.dim), ...]` data, laid out as `quantize` takes it. Vectors with
            a non-finite entry (and, for cosine, zero-norm ones) are left out, as if masked.
        cfg: the static configuration.
        method: `"data"` draws codes from the data (without replacement; with replacement
            plus small noise when there are fewer vectors than codes); `"kmeans"` runs
            k-means|| seeding and `kmeans_iters` Lloyd iterations (spherical for cosine),
            falling back to `"data"` when there are fewer vectors than codes.
        generator: source of randomness; the same seed gives the same codebook.
        kmeans_iters: Lloyd iterations for `"kmeans"`.
        mask: optional `[*B]` mask over `x`'s non-feature axes; rows at 0 are left out.
        sync: under data parallelism, `vqfunc.distributed.sync_for(group)`: the vectors of
            every rank are gathered on the group's first rank, which fits the codebook with
            its own `generator` and broadcasts it, so every rank gets the same params (every
            rank must call; a rank may hold no vector). None: this process's vectors only.

    Returns:
        `VQParams` with a new codebook (same shape, dtype and device); `params` is unchanged.

    Raises:
        ValueError: when no valid, unmasked vector is left (on any rank).
    """
    fitted = fit_params(
        params,
        x,
        cfg,
        method=method,
        generator=generator,
        kmeans_iters=kmeans_iters,
        mask=mask,
        sync=sync,
        where="warmup_params",
    )
    if fitted is None:
        raise ValueError(
            f"warmup_params: x holds no vectors (shape {tuple(x.shape)}"
            f"{', masked' if mask is not None else ''}{', on any rank' if sync else ''}) "
            "once the non-finite ones are left out; expected at least one"
        )
    assert isinstance(fitted, VQParams)  # a VQConfig's params
    return fitted


def fit_params(
    params: AnyParams,
    x: Tensor,
    cfg: QuantizerConfig,
    *,
    method: WarmupMethod,
    generator: torch.Generator | None,
    kmeans_iters: int,
    mask: Tensor | None,
    sync: WarmupSync | None,
    where: str,
) -> AnyParams | None:
    """`warmup_params` for either kind of configuration, None (on every rank) without data.

    The residual warm-up shares it, and a layer that warms up on "the first batch that holds
    data" decides the same way on every rank.
    """
    kind = VQConfig if isinstance(cfg, VQConfig) else type(cfg)
    _validate.check_params(params, cfg, where=where, kind=kind)
    _validate.check_input(x, cfg, where=where)
    _validate.check_same_device(x, params, where=where)
    if method not in _METHODS:
        raise ValueError(f"{where}: method must be one of {_METHODS}, got {method!r}")
    if not isinstance(kmeans_iters, int) or isinstance(kmeans_iters, bool) or kmeans_iters < 0:
        raise ValueError(f"{where}: kmeans_iters must be an int >= 0, got {kmeans_iters!r}")
    dim = cfg.dim % x.ndim
    moved = x.detach().movedim(dim, -1)
    rows = moved.reshape(-1, cfg.feature_size).to(compute_dtype(x, params))
    # Invalid rows (non-finite; zero-norm with cosine) count as masked, as in `quantize`.
    parts = cfg.groups if isinstance(cfg, VQConfig) else 1
    keep = valid_rows(rows.view(-1, parts, cfg.feature_size // parts), _is_cosine(cfg))
    if mask is not None:
        _validate.check_mask(mask, tuple(moved.shape[:-1]), x, where=where)
        keep = keep & (mask.detach().reshape(-1) > 0)
    rows = rows[keep]  # a warm-up may read the device

    def fit(data: Tensor) -> Tensor:
        _validate.check_finite(data, where=where)
        return _fit_rows(params, data, cfg, method, generator, kmeans_iters)

    if sync is None:
        codebook = None if rows.shape[0] == 0 else fit(rows)
    else:
        codebook = sync.fit_on_first_rank(rows, params.codebook, fit)
    return None if codebook is None else params._replace(codebook=codebook)


def _is_cosine(cfg: QuantizerConfig) -> bool:
    return isinstance(cfg, VQConfig) and cfg.dist == "cosine"


def _fit_rows(
    params: AnyParams,
    rows: Tensor,
    cfg: QuantizerConfig,
    method: WarmupMethod,
    generator: torch.Generator | None,
    kmeans_iters: int,
) -> Tensor:
    """The raw codebook whose effective codes fit the finite rows `[M, F]`."""
    if isinstance(cfg, VQConfig):
        codebook = _fit_groups(rows, cfg, method, generator, kmeans_iters)
    else:
        # Imported here: the residual package builds on this module.
        from vqfunc.residual._warmup import fit_levels

        codebook = fit_levels(params, rows, cfg, method, generator, kmeans_iters)  # type: ignore[arg-type]
    raw = invert_affine(codebook, params, cfg)
    return raw.to(params.codebook.dtype)


def _fit_groups(
    rows: Tensor,
    cfg: VQConfig,
    method: WarmupMethod,
    generator: torch.Generator | None,
    kmeans_iters: int,
) -> Tensor:
    """Effective codes `cfg.codebook_shape` fitted to rows `[M, F]`, per codebook."""
    groups = rows.reshape(-1, cfg.groups, cfg.code_dim)
    k = cfg.codes_per_book
    if cfg.share:
        return fit_codes(groups.reshape(-1, cfg.code_dim), k, cfg, method, generator, kmeans_iters)
    return torch.stack(
        [
            fit_codes(groups[:, g], k, cfg, method, generator, kmeans_iters)
            for g in range(cfg.groups)
        ]
    )
