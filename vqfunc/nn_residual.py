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
from vqfunc.distributed import fit_across_ranks
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

    With `kmeans_init=True` the first batch seen in training mode fits the codebooks with
    k-means, level after level (`residual_warmup_params(method="kmeans")`), once; the buffer
    `kmeans_initialized` records it (and travels in `state_dict`). Under
    `torch.func.functional_call` the layer never writes to the tensors it is given.

    As in vqtorch, `groups` is the number of residual levels (`levels=` says the same), and
    with `share=False` `num_codes` counts the codes of all levels together. Unlike vqtorch,
    codes index the level's own codebook (vqtorch adds the offset `level * num_codes // groups`)
    and separate codebooks are stored as `[levels, num_codes // levels, feature_size]`.

    Args:
        feature_size, num_codes, groups, share, dim, beta, affine_lr, affine_groups, sync_nu,
        estimator: see `ResidualConfig` (`groups` is its `levels`).
        levels: the number of levels, a clearer name for `groups`; give one or the other.
        kmeans_init: warm the codebooks with k-means on the first training batch.
        generator, device, dtype: go to `init_residual_params`.
    """

    codebook: nn.Parameter
    affine_scale: nn.Parameter
    affine_bias: nn.Parameter
    kmeans_initialized: Tensor

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
        kmeans_init: bool = False,
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
            # Empty affine parameters (affine off) take no gradient: DistributedDataParallel
            # would otherwise wait for it and fail.
            self.register_parameter(name, nn.Parameter(value, requires_grad=value.numel() > 0))
        self.vq_enabled = True  # switched off by `vqfunc.no_vq`
        self.kmeans_init = bool(kmeans_init)
        self.register_buffer(
            "kmeans_initialized", torch.tensor(False, device=params.codebook.device)
        )
        self._kmeans_done: bool | None = None  # Python mirror of the buffer: no device reads
        self._remember_own_codebook()
        self.register_load_state_dict_post_hook(_after_load)

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
        if self.training and self.kmeans_init and not self._kmeans_is_done():
            self._kmeans_warmup(x, mask)
        z_q, out = residual_quantize(self.params, x, self.cfg, mask=mask)
        return z_q, residual_misc_dict(out)

    def _remember_own_codebook(self) -> None:
        # Kept outside `_parameters` (a plain `__dict__` entry), so it is not a second parameter.
        self.__dict__["_own_codebook"] = self.codebook

    def _apply(self, fn: Any, recurse: bool = True) -> ResidualVectorQuantize:
        # `.to()`, `.double()` may bind new parameter objects.
        result = super()._apply(fn, recurse)
        self._remember_own_codebook()
        return result

    def _kmeans_is_done(self) -> bool:
        if self._kmeans_done is None:
            self._kmeans_done = bool(self.kmeans_initialized)
        return self._kmeans_done

    @torch.no_grad()
    def _kmeans_warmup(self, x: Tensor, mask: Tensor | None) -> None:
        if self.codebook is not self.__dict__["_own_codebook"]:  # functional_call: stay pure
            return
        rows = x.detach().movedim(self.cfg.dim % x.ndim, -1).reshape(-1, self.cfg.feature_size)
        if mask is not None:
            rows = rows[mask.reshape(-1).to(torch.bool)]  # once per layer, so a sync is fine
        params, flat_cfg = self.params, self.cfg.replace(dim=-1)
        # Under torch.distributed: fitted on the first rank from every rank's rows, broadcast.
        codebook = fit_across_ranks(
            rows,
            params.codebook,
            lambda data: residual_warmup_params(params, data, flat_cfg, method="kmeans").codebook,
        )
        if codebook is None:
            return  # no rank has vectors yet: try again on the next batch
        self.load_params(params._replace(codebook=codebook))
        self.kmeans_initialized.fill_(True)
        self._kmeans_done = True

    def extra_repr(self) -> str:
        c = self.cfg
        text = (
            f"feature_size={c.feature_size}, num_codes={c.num_codes}, levels={c.levels}, "
            f"share={c.share}, dim={c.dim}"
        )
        for name in ("affine_lr", "sync_nu"):
            if getattr(c, name):
                text += f", {name}={getattr(c, name)}"
        if c.estimator != "ste":
            text += f", estimator={c.estimator!r}"
        if self.kmeans_init:
            text += ", kmeans_init=True"
        return text


def _after_load(module: nn.Module, incompatible_keys: Any) -> None:
    # The k-means flag may have changed, and `load_state_dict(assign=True)` binds new tensors.
    assert isinstance(module, ResidualVectorQuantize)
    module._kmeans_done = None
    module._remember_own_codebook()


def residual_misc_dict(out: ResidualOutput) -> dict[str, Any]:
    """vqtorch's `misc` dictionary for a `ResidualOutput` (with vqtorch's key aliases)."""
    misc: dict[str, Any] = out._asdict()
    misc["q"] = out.codes
    misc["d"] = out.distances
    misc["z_res"] = out.residuals
    return misc
