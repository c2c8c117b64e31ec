"""`ResidualVectorQuantize`: the `nn.Module` shim over `residual_quantize`.

The layer holds the params as `nn.Parameter`s named like the fields of `VQParams`, so
`torch.func.functional_call(layer, params._asdict(), (x,))` equals
`vqfunc.residual_quantize(params, x, layer.cfg)`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vqfunc.config import Estimator
from vqfunc.no_vq import vq_disabled_everywhere
from vqfunc.params import VQParams
from vqfunc.residual import (
    ResidualConfig,
    ResidualOutput,
    init_residual_params,
    residual_quantize,
    residual_warmup_params,
)
from vqfunc.warmup import WarmupMethod


class ResidualVectorQuantize(nn.Module):
    """A residual vector-quantization layer, a drop-in for vqtorch's `ResidualVectorQuant`.

    `z_q, misc = layer(z_e)`: `z_q` has `z_e`'s shape and dtype and is the sum of the codes
    of all levels; `misc["loss"]` is the commitment loss between `z_e` and that sum (a scalar
    mean); `misc` also holds `"codes"` (alias `"q"`, `[*B, levels]`), `"distances"` (alias
    `"d"`), `"residuals"` (alias `"z_res"`), `"perplexity"`, `"z"`, `"z_q"` and `"histogram"`
    (see `ResidualOutput`).

    As in vqtorch, `groups` is the number of residual levels (`levels=` says the same), and
    with `share=False` `num_codes` counts the codes of all levels together. Unlike vqtorch,
    codes index the level's own codebook (vqtorch adds the offset `level * num_codes // groups`)
    and separate codebooks are stored as `[levels, num_codes // levels, feature_size]`.

    Args:
        feature_size, num_codes, groups, share, dim, beta, affine_lr, affine_groups, sync_nu,
        estimator: see `ResidualConfig` (`groups` is its `levels`).
        levels: the number of levels, a clearer name for `groups`; give one or the other.
        generator, device, dtype: go to `init_residual_params`.
    """

    codebook: nn.Parameter
    affine_scale: nn.Parameter
    affine_bias: nn.Parameter

    def __init__(
        self,
        feature_size: int,
        num_codes: int,
        groups: int = 1,
        share: bool = True,
        *,
        levels: int | None = None,
        dim: int = 1,
        beta: float = 0.95,
        affine_lr: float = 0.0,
        affine_groups: int = 1,
        sync_nu: float = 0.0,
        estimator: Estimator = "ste",
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if levels is not None and groups not in (1, levels):
            raise ValueError(
                f"ResidualVectorQuantize: groups={groups} and levels={levels} both give the "
                "number of residual levels and disagree; pass only one of them"
            )
        self.cfg = ResidualConfig(
            feature_size=feature_size,
            num_codes=num_codes,
            levels=groups if levels is None else levels,
            share=share,
            dim=dim,
            beta=beta,
            affine_lr=affine_lr,
            affine_groups=affine_groups,
            sync_nu=sync_nu,
            estimator=estimator,
        )
        params = init_residual_params(self.cfg, generator=generator, device=device, dtype=dtype)
        for name, value in params._asdict().items():
            self.register_parameter(name, nn.Parameter(value))
        self.vq_enabled = True  # switched off by `vqfunc.no_vq`

    @property
    def params(self) -> VQParams:
        """The layer's parameters as a `VQParams` (the layer's own tensors, not copies)."""
        return VQParams(self.codebook, self.affine_scale, self.affine_bias)

    @torch.no_grad()
    def load_params(self, params: VQParams) -> None:
        """Copy `params` into the layer's parameters (shapes must match)."""
        own = self.params._asdict()
        for name, value in params._asdict().items():
            if value.shape != own[name].shape:
                raise ValueError(
                    f"ResidualVectorQuantize.load_params: params.{name} has shape "
                    f"{tuple(value.shape)}, expected {tuple(own[name].shape)}"
                )
        for name, value in params._asdict().items():
            own[name].copy_(value)

    @torch.no_grad()
    def warmup(
        self,
        x: Tensor,
        *,
        method: WarmupMethod = "data",
        generator: torch.Generator | None = None,
    ) -> None:
        """Fit the codebooks to the data `x` level after level (see `residual_warmup_params`)."""
        self.load_params(
            residual_warmup_params(self.params, x, self.cfg, method=method, generator=generator)
        )

    def forward(self, x: Tensor, *, mask: Tensor | None = None) -> tuple[Tensor, dict[str, Any]]:
        """Quantize `x` (`[..., F (at dim), ...]`); see `vqfunc.residual_quantize`.

        Inside `vqfunc.no_vq` the layer returns `x` unchanged with a zero loss.
        """
        if not self.vq_enabled or vq_disabled_everywhere():
            return x, {"loss": x.new_zeros(())}
        z_q, out = residual_quantize(self.params, x, self.cfg, mask=mask)
        return z_q, residual_misc_dict(out)

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"feature_size={c.feature_size}, num_codes={c.num_codes}, levels={c.levels}, "
            f"share={c.share}, dim={c.dim}"
        )


def residual_misc_dict(out: ResidualOutput) -> dict[str, Any]:
    """vqtorch's `misc` dictionary for a `ResidualOutput` (with vqtorch's key aliases)."""
    misc: dict[str, Any] = out._asdict()
    misc["q"] = out.codes
    misc["d"] = out.distances
    misc["z_res"] = out.residuals
    return misc
