"""`VectorQuantize`: the `nn.Module` shim over the functional core.

The layer holds the params as `nn.Parameter`s named like the fields of `VQParams`, calls the
pure functions, and is the library's single place of mutation. `layer.params` is a `VQParams`
view of its own tensors, and `torch.func.functional_call(layer, params._asdict(), (x,))`
equals `vqfunc.quantize(params, x, layer.cfg)`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vqfunc.config import Dist, Estimator, VQConfig
from vqfunc.params import VQParams, init_params
from vqfunc.quantize import QuantizeOutput, quantize


class VectorQuantize(nn.Module):
    """A vector-quantization layer, a drop-in for vqtorch's `VectorQuant`.

    `z_q, misc = layer(z_e)`: `z_q` has `z_e`'s shape and dtype; `misc["loss"]` is the
    commitment loss; `misc` also holds `"codes"` (alias `"q"`), `"distances"` (alias `"d"`),
    `"perplexity"`, `"z"`, `"z_q"` and `"histogram"` (see `QuantizeOutput`).

    The arguments are the fields of `VQConfig` (see there); `generator`, `device` and `dtype`
    go to `init_params`.
    """

    codebook: nn.Parameter
    affine_scale: nn.Parameter
    affine_bias: nn.Parameter

    def __init__(
        self,
        feature_size: int,
        num_codes: int,
        *,
        dist: Dist = "euclidean",
        vector_normalize: bool = False,
        groups: int = 1,
        share: bool = True,
        dim: int = 1,
        beta: float = 0.95,
        affine_lr: float = 0.0,
        affine_groups: int = 1,
        sync_nu: float = 0.0,
        estimator: Estimator = "ste",
        replace_freq: int = 0,
        replace_rho: float = 1e-2,
        ema_decay: float = 0.0,
        ema_eps: float = 1e-5,
        kmeans_init: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.cfg = VQConfig(
            feature_size=feature_size,
            num_codes=num_codes,
            dim=dim,
            dist=dist,
            vector_normalize=vector_normalize,
            groups=groups,
            share=share,
            beta=beta,
            affine_lr=affine_lr,
            affine_groups=affine_groups,
            sync_nu=sync_nu,
            estimator=estimator,
            replace_freq=replace_freq,
            replace_rho=replace_rho,
            ema_decay=ema_decay,
            ema_eps=ema_eps,
            kmeans_init=kmeans_init,
        )
        params = init_params(self.cfg, generator=generator, device=device, dtype=dtype)
        for name, value in params._asdict().items():
            self.register_parameter(name, nn.Parameter(value))

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
                    f"VectorQuantize.load_params: params.{name} has shape {tuple(value.shape)}, "
                    f"expected {tuple(own[name].shape)}"
                )
        for name, value in params._asdict().items():
            own[name].copy_(value)

    def forward(self, x: Tensor, *, mask: Tensor | None = None) -> tuple[Tensor, dict[str, Any]]:
        """Quantize `x` (`[..., F (at dim), ...]`); see `vqfunc.quantize`."""
        z_q, out = quantize(self.params, x, self.cfg, mask=mask)
        return z_q, misc_dict(out)

    def extra_repr(self) -> str:
        c = self.cfg
        text = (
            f"feature_size={c.feature_size}, num_codes={c.num_codes}, dist={c.dist!r}, dim={c.dim}"
        )
        if c.groups > 1:
            text += f", groups={c.groups}, share={c.share}"
        return text


def misc_dict(out: QuantizeOutput) -> dict[str, Any]:
    """vqtorch's `misc` dictionary for a `QuantizeOutput` (with vqtorch's key aliases)."""
    misc: dict[str, Any] = out._asdict()
    misc["q"] = out.codes
    misc["d"] = out.distances
    return misc
