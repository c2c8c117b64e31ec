"""`ResidualVectorQuantize`: the `nn.Module` shim over `residual_quantize`.

The layer holds the params as `nn.Parameter`s named like the fields of `VQParams` and the
training state as a persistent buffer named like the field of `ResidualState`, so
`torch.func.functional_call(layer, params._asdict(), (x,))` equals
`vqfunc.residual_quantize(params, x, layer.cfg)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vqfunc._config import Estimator
from vqfunc._params import VQParams
from vqfunc._warmup import WarmupMethod
from vqfunc.distributed import fit_across_ranks
from vqfunc.nn._base import QuantizerShim, describe, misc_with_aliases
from vqfunc.nn._no_vq import vq_disabled_everywhere
from vqfunc.residual._quantize import (
    ResidualConfig,
    ResidualOutput,
    init_residual_params,
    residual_quantize,
    residual_warmup_params,
)
from vqfunc.residual._state import (
    ResidualState,
    _check_state,
    init_residual_state,
    residual_update_state,
)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class ResidualVectorQuantize(QuantizerShim):
    """A residual vector-quantization layer, a drop-in for vqtorch's `ResidualVectorQuant`.

    `z_q, misc = layer(z_e)`: `z_q` has `z_e`'s shape and dtype and is the sum of the codes
    of all levels; `misc["loss"]` is the commitment loss between `z_e` and that sum (a scalar
    mean); `misc` also holds `"codes"` (alias `"q"`, `[*B, levels]`), `"distances"` (alias
    `"d"`), `"residuals"` (alias `"z_res"`), `"perplexity"`, `"z"`, `"z_q"` and `"histogram"`
    (see `ResidualOutput`).

    With `kmeans_init=True` the first batch seen in training mode fits the codebooks with
    k-means, level after level (`residual_warmup_params(method="kmeans")`), once; the buffer
    `kmeans_initialized` records it (and travels in `state_dict`).

    With `replace_freq > 0`, every training forward pass then runs dead-code replacement
    (`vqfunc.residual_update_state`): a code no level used for `replace_freq` steps is replaced
    by a residual vector of the batch (with a shared codebook, one of any level; otherwise one
    of its own level's). The counters live in the buffer `replace_counters` (in `state_dict`);
    the returned `z_q` and `misc` are those of the codebook before the replacement. Under
    `torch.distributed` the ranks of `process_group` (default: the world group) take the same
    step. In `eval()` mode, or under `torch.func.functional_call` with other tensors, the layer
    never writes to its tensors.

    As in vqtorch, `groups` is the number of residual levels (`levels=` says the same), and
    with `share=False` `num_codes` counts the codes of all levels together. Unlike vqtorch,
    codes index the level's own codebook (vqtorch adds the offset `level * num_codes // groups`)
    and separate codebooks are stored as `[levels, num_codes // levels, feature_size]`.

    Args:
        feature_size, num_codes, groups, share, dim, beta, affine_lr, affine_groups, sync_nu,
        estimator, replace_freq, replace_rho: see `ResidualConfig` (`groups` is its `levels`).
        levels: the number of levels, a clearer name for `groups`; give one or the other.
        kmeans_init: warm the codebooks with k-means on the first training batch.
        generator, device, dtype: go to `init_residual_params`.
        process_group: the ranks that keep the replacement in agreement (default: world).
    """

    _STATE_NAMES = ResidualState._fields

    replace_counters: Tensor

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
        replace_freq: int = 0,
        replace_rho: float = 1e-2,
        kmeans_init: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        process_group: ProcessGroup | None = None,
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
            replace_freq=replace_freq,
            replace_rho=replace_rho,
        )
        params = init_residual_params(self.cfg, generator=generator, device=device, dtype=dtype)
        self.kmeans_init = bool(kmeans_init)
        self.process_group = process_group
        self._register_tensors(params, init_residual_state(params, self.cfg))
        self._register_load_state_dict_pre_hook(_fill_missing_counters, with_module=True)

    @property
    def state(self) -> ResidualState:
        """The layer's training state as a `ResidualState` (its own buffer, not a copy)."""
        return ResidualState(self.replace_counters)

    def load_params(self, params: VQParams) -> None:
        """Copy `params` into the layer's parameters (shapes must match)."""
        self._copy_params(params)

    @torch.no_grad()
    def load_state(self, state: ResidualState) -> None:
        """Copy `state` into the layer's buffer (shapes must match)."""
        _check_state(state, self.params, self.cfg, where="ResidualVectorQuantize.load_state")
        self._write(None, state)

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
        training = self.training and self._holds_own_tensors()
        if training and self.kmeans_init and not self._kmeans_initialized():
            self._kmeans_warmup(x, mask)
        updates = training and self.cfg.replace_freq > 0
        z_q, out = self._quantize_and_update(
            residual_quantize, residual_update_state, x, mask, updates=updates
        )
        return z_q, residual_misc_dict(out)

    @torch.no_grad()
    def _kmeans_warmup(self, x: Tensor, mask: Tensor | None) -> None:
        rows = x.detach().movedim(self.cfg.dim % x.ndim, -1).reshape(-1, self.cfg.feature_size)
        if mask is not None:
            rows = rows[mask.reshape(-1).to(torch.bool)]  # once per layer, so a sync is fine
        params, flat_cfg = self.params, self.cfg.replace(dim=-1)
        # Under torch.distributed: fitted on the first rank from every rank's rows, broadcast.
        codebook = fit_across_ranks(
            rows,
            params.codebook,
            lambda data: residual_warmup_params(params, data, flat_cfg, method="kmeans").codebook,
            group=self.process_group,
        )
        if codebook is None:
            return  # no rank has vectors yet: try again on the next batch
        self.load_params(params._replace(codebook=codebook))
        self._mark_kmeans_done()

    def extra_repr(self) -> str:
        c = self.cfg
        text = describe(
            c,
            ("feature_size", "num_codes", "levels", "share", "dim"),
            ("affine_lr", "sync_nu", "replace_freq"),
        )
        if c.estimator != "ste":
            text += f", estimator={c.estimator!r}"
        if self.kmeans_init:
            text += ", kmeans_init=True"
        return text


def _fill_missing_counters(
    module: ResidualVectorQuantize, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    # State dicts saved before the layer had replacement hold no counters: start them afresh.
    key = prefix + "replace_counters"
    if key not in state_dict and prefix + "codebook" in state_dict:
        state_dict[key] = init_residual_state(module.params, module.cfg).replace_counters


def residual_misc_dict(out: ResidualOutput) -> dict[str, Any]:
    """vqtorch's `misc` dictionary for a `ResidualOutput` (with vqtorch's key aliases)."""
    return misc_with_aliases(out, q="codes", d="distances", z_res="residuals")
