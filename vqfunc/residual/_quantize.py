"""Residual vector quantization: every level quantizes what the earlier levels left.

With `r_0 = z`: `q_i = C_i[argmin_k ||r_{i-1} - C_i[k]||]`, `r_i = r_{i-1} - q_i`, and the
output is `z_q = q_1 + ... + q_L`. Levels run one after the other (each needs the previous
residual); within a level the search is the library's chunked nearest-code search.

The codebooks are laid out like those of a grouped quantizer with one group per level, so
`VQParams`, the affine re-parameterisation and the histograms are shared with `quantize`:
one `[K, F]` codebook for all levels (`share=True`) or `[L, K / L, F]` (`share=False`, where
`num_codes` counts the codes of all levels together, as in vqtorch).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch
from torch import Tensor

from vqfunc import _validate
from vqfunc._affine import effective_codebook
from vqfunc._config import Estimator, VQConfig, _BookLayout, _positive_int
from vqfunc._estimators import estimate
from vqfunc._layout import Layout, from_rows, normalize_dim, rows_to_batch, to_rows
from vqfunc._losses import commitment_loss
from vqfunc._metrics import perplexity
from vqfunc._params import VQParams, affine_shape, init_params
from vqfunc._quantize import book_histogram, code_vectors, compute_dtype
from vqfunc._search import nearest_codes
from vqfunc._warmup import WarmupMethod, warmup_params


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResidualConfig(_BookLayout):
    """Static configuration of a residual vector quantizer.

    Args:
        feature_size: size `F` of the quantized axis `dim` of the input; every code has `F`
            entries (residual levels do not split the vector).
        num_codes: number of codes. With `share=False` this counts the codes of all levels
            together: each of the `levels` codebooks holds `num_codes // levels` codes.
        levels: number of residual levels `L` (vqtorch calls it `groups`).
        share: whether all levels use one codebook (default) or each level its own.
        dim: the feature axis of the input (negative values count from the end); default 1.
        beta: weight of the codebook term in the commitment loss, in [0, 1]. The loss compares
            the input with the sum of all levels.
        affine_lr: learning-rate multiplier of the affine re-parameterisation of each codebook;
            0 turns it off.
        affine_groups: number of consecutive blocks of codes with their own affine scale and
            bias; must divide the number of codes per codebook.
        sync_nu: weight `nu` of the synchronized update, applied to the sum of the levels.
        estimator: `"ste"` (straight-through) or `"rotation"`, applied to the sum of the levels.
        replace_freq: dead-code replacement period `T` in training steps; 0 turns it off (see
            `vqfunc.residual_update_state`).
        replace_rho: relative noise `rho` added to the residual vectors that replace dead codes.
    """

    feature_size: int
    num_codes: int
    levels: int = 1
    share: bool = True
    dim: int = 1
    beta: float = 0.95
    affine_lr: float = 0.0
    affine_groups: int = 1
    sync_nu: float = 0.0
    estimator: Estimator = "ste"
    replace_freq: int = 0
    replace_rho: float = 1e-2

    _PARTS = "levels"

    def __post_init__(self) -> None:
        for name in ("feature_size", "num_codes", "levels", "affine_groups"):
            _positive_int(name, getattr(self, name), owner="ResidualConfig")
        self._check_books("ResidualConfig")
        try:  # the remaining scalars are checked by VQConfig, under this class's name
            self.book_config()
            self.level_config()
        except (ValueError, TypeError) as error:
            message = str(error).replace("VQConfig:", "ResidualConfig:")
            raise type(error)(message) from None

    @property
    def codebook_shape(self) -> tuple[int, ...]:
        """`(K, F)` when shared, `(levels, K, F)` with one codebook per level."""
        if self.share:
            return (self.num_codes, self.feature_size)
        return (self.levels, self.codes_per_book, self.feature_size)

    def book_config(self) -> VQConfig:
        """The grouped `VQConfig` whose params are laid out like this quantizer's.

        One group of `feature_size` per level: its codebook, affine parameters and histograms
        have exactly the shapes of the residual quantizer's.
        """
        return VQConfig(
            feature_size=self.feature_size * self.levels,
            num_codes=self.num_codes,
            dim=-1,
            groups=self.levels,
            share=self.share,
            replace_freq=self.replace_freq,
            replace_rho=self.replace_rho,
            **self._common_fields(),
        )

    def level_config(self) -> VQConfig:
        """A plain `VQConfig` for one level on its own (one codebook of `codes_per_book`)."""
        return VQConfig(
            feature_size=self.feature_size,
            num_codes=self.codes_per_book,
            dim=self.dim,
            **self._common_fields(),
        )

    def _common_fields(self) -> dict[str, Any]:
        """The fields that `book_config` and `level_config` take over unchanged."""
        names = ("beta", "affine_lr", "affine_groups", "sync_nu", "estimator")
        return {name: getattr(self, name) for name in names}

    def replace(self, **changes: object) -> ResidualConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


class ResidualOutput(NamedTuple):
    """Everything `residual_quantize` computed besides the quantized tensor.

    With `B` the input's shape without its feature axis and `L = cfg.levels`:

    Attributes:
        codes: `[*B, L]` int64 code of every level. With separate codebooks, level `i`'s code
            indexes that level's codebook (`params.codebook[i]`); vqtorch's flat row index is
            `codes[..., i] + i * cfg.codes_per_book`.
        distances: `[*B, L]` the norm `||r_i||` of the residual left after each level.
        loss: scalar commitment loss between the input and the sum of all levels.
        z: `[*B, F]` the input vectors.
        z_q: `[*B, F]` the sum of the selected codes of all levels, before the gradient
            estimator; differentiable with respect to the codebook.
        residuals: `[*B, L + 1, F]` the residuals `r_0 = z, r_1, ..., r_L = z - z_q`.
        perplexity: scalar code perplexity (mean over codebooks).
        histogram: `[num_books, K]` code counts over all levels (masked rows excluded).
    """

    codes: Tensor
    distances: Tensor
    loss: Tensor
    z: Tensor
    z_q: Tensor
    residuals: Tensor
    perplexity: Tensor
    histogram: Tensor


def init_residual_params(
    cfg: ResidualConfig,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> VQParams:
    """Fresh parameters: standard-normal codebooks and zero raw affine parameters.

    Returns:
        `VQParams` with `codebook` of shape `cfg.codebook_shape` and raw affine parameters of
        shape `[A, F]` (`[L, A, F]` with separate codebooks; `A = 0` when affine is off).
    """
    _check_config(cfg, where="init_residual_params")
    return init_params(cfg.book_config(), generator=generator, device=device, dtype=dtype)


def _check_config(cfg: object, *, where: str) -> None:
    if not isinstance(cfg, ResidualConfig):
        hint = " (for a plain or grouped quantizer use vqfunc.quantize)"
        raise TypeError(
            f"{where}: cfg must be a ResidualConfig, got {type(cfg).__name__}"
            f"{hint if isinstance(cfg, VQConfig) else ''}"
        )


def _check_params(params: object, cfg: ResidualConfig, *, where: str) -> None:
    if isinstance(params, VQParams):
        book = cfg.book_config()
        expected = {"codebook": cfg.codebook_shape, "affine_scale": affine_shape(book)}
        expected["affine_bias"] = expected["affine_scale"]
        for name, shape in expected.items():
            value = getattr(params, name)
            if isinstance(value, Tensor) and tuple(value.shape) != shape:
                raise ValueError(
                    f"{where}: params.{name} has shape {tuple(value.shape)}, but cfg "
                    f"(num_codes={cfg.num_codes}, feature_size={cfg.feature_size}, "
                    f"levels={cfg.levels}, share={cfg.share}, affine_lr={cfg.affine_lr}, "
                    f"affine_groups={cfg.affine_groups}) expects {shape}"
                )
    _validate.check_params(params, cfg.book_config(), where=where)


def _quantize_levels(
    codebook: Tensor, rows: Tensor, cfg: ResidualConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """Rows `[M, F]` through all levels: `(picked [M, L, F], codes [M, L], distances [M, L])`.

    The search sees the residuals without gradient; the picked codes stay differentiable with
    respect to the codebook.
    """
    residual = rows.detach()
    picked, codes, distances = [], [], []
    for level in range(cfg.levels):
        book = codebook if cfg.share else codebook[level]
        level_codes, level_distances = nearest_codes(residual, book)
        code_vectors = book.index_select(0, level_codes)
        residual = residual - code_vectors.detach()
        picked.append(code_vectors)
        codes.append(level_codes)
        distances.append(level_distances)
    return torch.stack(picked, 1), torch.stack(codes, 1), torch.stack(distances, 1)


def residual_quantize(
    params: VQParams, x: Tensor, cfg: ResidualConfig, *, mask: Tensor | None = None
) -> tuple[Tensor, ResidualOutput]:
    """Quantize `x` with `cfg.levels` residual levels.

    Pure: reads `params` and `x`, returns new tensors; composes with `torch.func.grad` and
    `torch.func.functional_call`. The gradient estimator (and the synchronized update) act on
    the sum of the levels, and the loss compares `x` with that sum.

    Args:
        params: codebook(s) and affine parameters, from `init_residual_params`.
        x: `[..., F (at cfg.dim), ...]` floating tensor of any rank >= 1; may be empty.
        cfg: the static configuration.
        mask: optional `[*B]` tensor (bool or float) over the input's non-feature axes; rows
            at 0 are quantized but excluded from the loss, histogram and perplexity.

    Returns:
        z_q: shaped and typed like `x`, the sum of the selected codes of all levels in the
            forward pass, with the gradient of `cfg.estimator` to `x`.
        out: a `ResidualOutput`.
    """
    _check_config(cfg, where="residual_quantize")
    _check_params(params, cfg, where="residual_quantize")
    vector_cfg = cfg.level_config()
    _validate.check_input(x, vector_cfg, where="residual_quantize")
    _validate.check_same_device(x, params, where="residual_quantize")
    grouped_rows, layout = to_rows(x.to(compute_dtype(x, params)), vector_cfg)
    rows = grouped_rows[:, 0]
    row_mask = None
    if mask is not None:
        _validate.check_mask(mask, layout.batch_shape, x, where="residual_quantize")
        row_mask = mask.reshape(-1)
    book = cfg.book_config()
    codebook = effective_codebook(params, book).to(rows.dtype)
    picked, codes, distances = _quantize_levels(codebook, rows, cfg)
    z_q = picked.sum(1)
    loss = commitment_loss(rows, z_q, cfg.beta, mask=row_mask)
    out_rows = estimate(rows, z_q, book)
    histogram = book_histogram(codes, book, row_mask)
    residuals = torch.cat([rows.unsqueeze(1), rows.unsqueeze(1) - picked.cumsum(1)], 1)
    batch = layout.batch_shape
    output = ResidualOutput(
        codes=codes.reshape(*batch, cfg.levels),
        distances=distances.reshape(*batch, cfg.levels),
        loss=loss,
        z=rows_to_batch(grouped_rows, layout),
        z_q=rows_to_batch(z_q.unsqueeze(1), layout),
        residuals=residuals.reshape(*batch, cfg.levels + 1, cfg.feature_size),
        perplexity=perplexity(histogram).mean(),
        histogram=histogram,
    )
    return from_rows(out_rows.unsqueeze(1), layout).to(x.dtype), output


def residual_dequantize(params: VQParams, codes: Tensor, cfg: ResidualConfig) -> Tensor:
    """The sum over levels of the codes' vectors, in the input layout.

    `residual_dequantize(params, out.codes, cfg)` equals the forward value of
    `residual_quantize`'s `z_q`.

    Args:
        params: the codebook(s).
        codes: `[*B, L]` integer codes, one per level (indices into the level's own codebook
            with separate codebooks).
        cfg: the static configuration.

    Returns:
        `[..., F (at cfg.dim), ...]` tensor of rank `len(B) + 1` in the params' dtype.
    """
    _check_config(cfg, where="residual_dequantize")
    _check_params(params, cfg, where="residual_dequantize")
    if not isinstance(codes, Tensor):
        raise TypeError(f"residual_dequantize: codes must be a tensor, got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"residual_dequantize: codes must be an integer tensor, got {codes.dtype}")
    if codes.ndim == 0 or codes.shape[-1] != cfg.levels:
        raise ValueError(
            f"residual_dequantize: codes must have a trailing axis of size levels={cfg.levels} "
            f"(one code per level), got shape {tuple(codes.shape)}"
        )
    if codes.device != params.codebook.device:
        raise ValueError(
            f"residual_dequantize: codes are on {codes.device} but params.codebook is on "
            f"{params.codebook.device}"
        )
    batch_shape = tuple(codes.shape[:-1])
    dim = normalize_dim(cfg.dim, len(batch_shape) + 1, where="residual_dequantize", name="cfg.dim")
    code_rows = codes.reshape(-1, cfg.levels).long()
    vectors = code_vectors(params, code_rows, cfg.book_config())
    return from_rows(vectors.sum(1, keepdim=True), Layout(batch_shape, dim))


def residual_warmup_params(
    params: VQParams,
    x: Tensor,
    cfg: ResidualConfig,
    *,
    method: WarmupMethod = "data",
    generator: torch.Generator | None = None,
    kmeans_iters: int = 20,
) -> VQParams:
    """New params whose codebooks are fitted to the vectors of `x`, level after level.

    Level `i` is fitted (with `warmup_params`'s `method`) to the residuals that the already
    fitted levels `1 .. i-1` leave. With a shared codebook, the levels are first fitted one by
    one as above, and the shared codebook is then fitted once to the residuals of all levels
    pooled together.

    Args:
        params: current params; affine parameters are kept (the effective codes fit the data).
        x: `[..., F (at cfg.dim), ...]` finite data, laid out as `residual_quantize` takes it.
        cfg: the static configuration.
        method: `"data"` or `"kmeans"` (see `warmup_params`).
        generator: source of randomness; the same seed gives the same codebooks.
        kmeans_iters: Lloyd iterations for `"kmeans"`.

    Returns:
        `VQParams` with new codebooks (same shapes, dtype and device); `params` is unchanged.
    """
    _check_config(cfg, where="residual_warmup_params")
    _check_params(params, cfg, where="residual_warmup_params")
    level_cfg = cfg.level_config()
    _validate.check_input(x, level_cfg, where="residual_warmup_params")
    residual = x.detach().movedim(cfg.dim % x.ndim, -1).reshape(-1, cfg.feature_size)
    flat_cfg = level_cfg.replace(dim=-1)
    pooled, fitted = [], []
    for level in range(cfg.levels):
        level_params = params if cfg.share else VQParams(*(p[level] for p in params))
        new = warmup_params(
            level_params,
            residual,
            flat_cfg,
            method=method,
            generator=generator,
            kmeans_iters=kmeans_iters,
        )
        book = effective_codebook(new, flat_cfg).to(residual.dtype)
        codes, _ = nearest_codes(residual, book)
        pooled.append(residual)
        fitted.append(new.codebook)
        residual = residual - book[codes]
    if cfg.share:
        return warmup_params(
            params,
            torch.cat(pooled),
            flat_cfg,
            method=method,
            generator=generator,
            kmeans_iters=kmeans_iters,
        )
    return params._replace(codebook=torch.stack(fitted))
