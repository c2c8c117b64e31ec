"""`warmup_params`: codebooks initialised from data."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from vqfunc import _validate
from vqfunc._affine import invert_affine
from vqfunc._config import VQConfig
from vqfunc._kmeans import _sample_indices, kmeans
from vqfunc._layout import to_rows
from vqfunc._params import VQParams
from vqfunc._quantize import compute_dtype

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


def _fit_codebook(
    data: Tensor,
    k: int,
    cfg: VQConfig,
    method: WarmupMethod,
    generator: torch.Generator | None,
    kmeans_iters: int,
) -> Tensor:
    if method == "kmeans" and data.shape[0] >= k:
        return kmeans(
            data, k, iters=kmeans_iters, spherical=cfg.dist == "cosine", generator=generator
        )
    return sample_codes(data, k, generator=generator)


def warmup_params(
    params: VQParams,
    x: Tensor,
    cfg: VQConfig,
    *,
    method: WarmupMethod = "data",
    generator: torch.Generator | None = None,
    kmeans_iters: int = 20,
) -> VQParams:
    """New params whose codebook is fitted to the vectors of `x`.

    Args:
        params: current params; only the codebook is replaced (affine parameters are kept,
            and the raw codes are chosen so that the *effective* codes fit the data).
        x: `[..., F (at cfg.dim), ...]` data, laid out as `quantize` takes it; finite.
        cfg: the static configuration.
        method: `"data"` draws codes from the data (without replacement; with replacement
            plus small noise when there are fewer vectors than codes); `"kmeans"` runs
            k-means++ seeding and `kmeans_iters` Lloyd iterations (spherical for cosine),
            falling back to `"data"` when there are fewer vectors than codes.
        generator: source of randomness; the same seed gives the same codebook.
        kmeans_iters: Lloyd iterations for `"kmeans"`.

    Returns:
        `VQParams` with a new codebook (same shape, dtype and device); `params` is unchanged.
    """
    _validate.check_params(params, cfg, where="warmup_params")
    _validate.check_input(x, cfg, where="warmup_params")
    _validate.check_same_device(x, params, where="warmup_params")
    if method not in _METHODS:
        raise ValueError(f"warmup_params: method must be one of {_METHODS}, got {method!r}")
    if not isinstance(kmeans_iters, int) or kmeans_iters < 0:
        raise ValueError(f"warmup_params: kmeans_iters must be an int >= 0, got {kmeans_iters!r}")
    rows, _ = to_rows(x.detach().to(compute_dtype(x, params)), cfg)
    if rows.shape[0] == 0:
        raise ValueError(
            f"warmup_params: x holds no vectors (shape {tuple(x.shape)}); expected at least one"
        )
    _validate.check_finite(rows, where="warmup_params")
    k = cfg.codes_per_book
    if cfg.share:
        codebook = _fit_codebook(
            rows.reshape(-1, cfg.code_dim), k, cfg, method, generator, kmeans_iters
        )
    else:
        codebook = torch.stack(
            [
                _fit_codebook(rows[:, g], k, cfg, method, generator, kmeans_iters)
                for g in range(cfg.groups)
            ]
        )
    raw = invert_affine(codebook, params, cfg)
    return params._replace(codebook=raw.to(params.codebook.dtype))
