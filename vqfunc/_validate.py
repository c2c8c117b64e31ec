"""Checks at the edge of the public API: every error names the argument, the value and what
was expected, and is raised before anything is computed or changed."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from vqfunc._config import QuantizerConfig, VQConfig
from vqfunc._layout import normalize_dim
from vqfunc._params import AnyParams, ResidualParams, VQParams

_FLOAT_DTYPES = "float16, bfloat16, float32 or float64"


class FeatureAxis(Protocol):
    """What `check_input` reads of a configuration: the feature axis and its size."""

    @property
    def feature_size(self) -> int: ...

    @property
    def dim(self) -> int: ...


def check_config(cfg: object, expected: type[QuantizerConfig], *, where: str) -> None:
    """`cfg` is an `expected` configuration (`VQConfig` or `ResidualConfig`)."""
    if isinstance(cfg, expected):
        return
    hint = ""
    if expected is VQConfig and isinstance(cfg, QuantizerConfig):
        hint = f" (for a {type(cfg).__name__} use the functions of vqfunc.residual)"
    elif isinstance(cfg, VQConfig):
        hint = " (for a plain or grouped quantizer use the functions of vqfunc)"
    public = "vqfunc.VQConfig" if expected is VQConfig else f"vqfunc.residual.{expected.__name__}"
    raise TypeError(
        f"{where}: cfg must be a {public} (e.g. {expected.__name__}(feature_size=..., "
        f"num_codes=...) or layer.cfg), got {type(cfg).__name__}{hint}"
    )


def check_params(
    params: object, cfg: QuantizerConfig, *, where: str, kind: type[QuantizerConfig] = VQConfig
) -> None:
    """`cfg` is a `kind` configuration, and `params` a `VQParams` of floating tensors shaped as
    `cfg` says, on one device."""
    check_config(cfg, kind, where=where)
    projections: dict[str, tuple[int, ...]] = getattr(cfg, "projection_shapes", {})
    record = ResidualParams if projections else VQParams
    if not isinstance(params, record):
        how = "vqfunc.residual.init_params(cfg)" if projections else "vqfunc.init_params(cfg)"
        why = " (cfg.codebook_dim is set)" if projections else ""
        raise TypeError(
            f"{where}: params must be a {record.__name__}{why} (from {how} or layer.params), "
            f"got {type(params).__name__}"
        )
    layout = cfg.layout
    expected = {
        "codebook": layout.codebook_shape,
        "affine_scale": layout.affine_shape,
        "affine_bias": layout.affine_shape,
        **projections,
    }
    for name, shape in expected.items():
        value = getattr(params, name)
        if not isinstance(value, Tensor):
            raise TypeError(f"{where}: params.{name} must be a tensor, got {type(value).__name__}")
        if not value.dtype.is_floating_point:
            raise TypeError(
                f"{where}: params.{name} must be a floating tensor ({_FLOAT_DTYPES}), "
                f"got {value.dtype}"
            )
        if tuple(value.shape) != shape:
            raise ValueError(
                f"{where}: params.{name} has shape {tuple(value.shape)}, but cfg "
                f"({cfg.describe()}) expects {shape}"
            )
        if value.device != params.codebook.device:
            raise ValueError(
                f"{where}: params.{name} is on {value.device} but params.codebook is on "
                f"{params.codebook.device}; expected all params on one device"
            )


def check_input(x: object, cfg: FeatureAxis, *, where: str, name: str = "x") -> int:
    """`x` is a floating tensor of rank >= 1 with `cfg.feature_size` on `cfg.dim`.

    Returns the non-negative feature axis.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(
            f"{where}: {name} must be a floating tensor ({_FLOAT_DTYPES}), got {x.dtype}; "
            f"convert it first, e.g. {name}.float()"
        )
    if x.ndim == 0:
        raise ValueError(
            f"{where}: {name} is a scalar; expected a tensor of rank >= 1 with "
            f"feature_size={cfg.feature_size} on dim={cfg.dim}"
        )
    # Axes of the right size, the last one written as -1 (the usual `[..., F]` layout).
    candidates = [
        "-1" if d == x.ndim - 1 else str(d) for d in range(x.ndim) if x.shape[d] == cfg.feature_size
    ]
    hint = ""
    if candidates:
        hint = " (did you mean " + " or ".join(f"dim={d}" for d in candidates) + "?)"
    if not -x.ndim <= cfg.dim < x.ndim and candidates:
        raise IndexError(
            f"{where}: cfg.dim={cfg.dim} is out of range for {name} of shape {tuple(x.shape)} "
            f"(rank {x.ndim}; expected a value in [{-x.ndim}, {x.ndim - 1}]){hint}"
        )
    dim = normalize_dim(cfg.dim, x.ndim, where=where, name="cfg.dim")
    if x.shape[dim] != cfg.feature_size:
        raise ValueError(
            f"{where}: {name} has {x.shape[dim]} features on dim={cfg.dim} (shape "
            f"{tuple(x.shape)}), but cfg.feature_size is {cfg.feature_size}{hint}"
        )
    return dim


def check_same_device(x: Tensor, params: AnyParams, *, where: str, name: str = "x") -> None:
    if x.device != params.codebook.device:
        raise ValueError(
            f"{where}: {name} is on {x.device} but params.codebook is on "
            f"{params.codebook.device}; move one of them, e.g. {name}.to(params.codebook.device)"
        )


def check_mask(mask: object, batch_shape: tuple[int, ...], x: Tensor, *, where: str) -> None:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{where}: mask must be a tensor or None, got {type(mask).__name__}")
    if tuple(mask.shape) != batch_shape:
        raise ValueError(
            f"{where}: mask has shape {tuple(mask.shape)}, expected {batch_shape} "
            f"(the input's shape without its feature axis)"
        )
    if mask.device != x.device:
        raise ValueError(f"{where}: mask is on {mask.device} but x is on {x.device}")
    if mask.dtype.is_complex:
        raise TypeError(f"{where}: mask must be bool or real, got {mask.dtype}")
    if mask.dtype != torch.bool and _holds(~((mask >= 0) & (mask <= 1))):
        bad = mask[~((mask >= 0) & (mask <= 1))].flatten()[0].item()
        raise ValueError(
            f"{where}: mask holds {bad!r}; expected a bool mask or weights in [0, 1] "
            "(0 leaves a row out, 1 counts it fully)"
        )


def check_code_range(codes: Tensor, num_codes: int, *, where: str) -> None:
    """Every code is in `[0, num_codes)` (checked on CPU; on other devices an out-of-range
    code is the indexing kernel's error, or undefined)."""
    if _holds((codes < 0) | (codes >= num_codes)):
        outside = codes[(codes < 0) | (codes >= num_codes)].flatten()[0].item()
        raise IndexError(
            f"{where}: codes holds {outside}, outside [0, {num_codes}) (the codes of one "
            "codebook); negative codes do not count from the end"
        )


def _holds(condition: Tensor) -> bool:
    """Whether any element of a CPU `condition` is true; False where its values cannot be read
    without a device sync or inside a trace (CUDA, `torch.compile`, `vmap`): the checks of
    values run only where they cost nothing."""
    if condition.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    try:
        return bool(condition.any())
    except RuntimeError:  # vmap: the values of a batched tensor are not concrete here
        return False


def check_codes(codes: object, cfg: QuantizerConfig, *, where: str) -> None:
    """`codes` is an integer tensor with the trailing axis of one code per group (when
    `groups > 1`) or per level (always, for residual VQ)."""
    if not isinstance(codes, Tensor):
        raise TypeError(f"{where}: codes must be a tensor, got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"{where}: codes must be an integer tensor, got {codes.dtype}")
    parts = cfg.layout.parts
    check_code_range(codes, cfg.codes_per_book, where=where)
    has_trailing_axis = codes.ndim > 0 and codes.shape[-1] == parts
    if isinstance(cfg, VQConfig):
        if parts > 1 and not has_trailing_axis:
            raise ValueError(
                f"{where}: with groups={parts}, codes must have a trailing axis of size "
                f"{parts}, got shape {tuple(codes.shape)}"
            )
    elif not has_trailing_axis:
        raise ValueError(
            f"{where}: codes must have a trailing axis of size levels={parts} "
            f"(one code per level), got shape {tuple(codes.shape)}"
        )


def check_finite(x: Tensor, *, where: str, name: str = "x") -> None:
    """Refuse NaN or Inf (a host sync: only for warm-up, never in the hot path)."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        count = int(bad.sum())
        raise ValueError(
            f"{where}: {name} holds {count} non-finite value(s) (NaN or Inf) out of "
            f"{x.numel()}; expected finite data to warm the codebook from"
        )
