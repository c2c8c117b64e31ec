"""`ResidualVectorQuantize`: the `nn.Module` shim over `vqfunc.residual.quantize`.

The layer holds the params as `nn.Parameter`s named like the fields of `VQParams` and the
training state as persistent buffers named `<technique>_<field>` (`ema_counts`, `ema_sums`,
`replace_counters`, after `ResidualState`), so
`torch.func.functional_call(layer, params._asdict(), (x,))` equals
`vqfunc.residual.quantize(params, x, layer.cfg)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vqfunc._params import ResidualParams, VQParams
from vqfunc._validate import check_input
from vqfunc.nn._base import QuantizerShim, describe, misc_with_aliases
from vqfunc.nn._config_arguments import config_from_arguments, with_config_signature
from vqfunc.residual._config import ResidualConfig
from vqfunc.residual._dropout import draw_dropout
from vqfunc.residual._quantize import ResidualOutput, init_params, quantize
from vqfunc.residual._state import (
    ResidualState,
    check_residual_state,
    init_state,
    update_state,
)
from vqfunc.residual._warmup import fit_stacks

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class ResidualVectorQuantize(QuantizerShim):
    """A residual vector-quantization layer with vqtorch's arguments and vqfunc's conventions
    (for vqtorch's own layout, `vqfunc.vqtorch.nn.ResidualVectorQuant`).

    `z_q, misc = layer(z_e)`: `z_q` has `z_e`'s shape and dtype and is the sum of the codes
    of all levels; `misc["loss"]` is the commitment loss between `z_e` and that sum (a scalar
    mean); `misc` also holds `"codes"` (alias `"q"`, `[*B, levels]`), `"distances"` (alias
    `"d"`), `"residuals"` (alias `"z_res"`), `"perplexity"`, `"z"`, `"z_q"` and `"histogram"`
    (see `ResidualOutput`).

    With `kmeans_init=True` the first batch seen in training mode fits the codebooks with
    k-means, level after level (`vqfunc.residual.warmup_params(method="kmeans")`), once; the buffer
    `kmeans_initialized` records it (and travels in `state_dict`).

    With `ema_decay > 0`, every training forward pass then moves each level's codebook by the
    exponential moving average of the residuals assigned to its codes (`vqfunc.ema_update`,
    EnCodec's update); the statistics live in the buffers `ema_counts` and `ema_sums`, and the
    codebook has `requires_grad=False` (the averages alone move it).

    With `replace_rule="usage"` and `replace_threshold > 0`, the dead codes are instead those
    whose running average of use fell below the threshold (EnCodec's and Mimi's rule, see
    `docs/restarts.md`), kept in the buffer `replace_usage`.

    With `replace_freq > 0`, every training forward pass then runs dead-code replacement
    (`vqfunc.residual.update_state`): a code no level used for `replace_freq` steps is replaced
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

    Grouped residual VQ (HiFi-Codec) is `channel_groups=G`: the feature axis splits into `G`
    groups of `feature_size // G` channels, each with a residual stack of its own (every
    parameter and buffer gains a leading axis `G`, `misc["codes"]` is `[*B, G, levels]`). It
    is named `channel_groups`, not `groups`, because `groups` already means the levels here
    (vqtorch's name) and in `vqfunc.vqtorch`.

    Args:
        feature_size: size `F` of the quantized axis `dim`.
        num_codes: number of codes (with `share=False`, of all levels together).
        groups: the number of residual levels, as vqtorch names it (`levels=` says the same;
            give one or the other).
        share: whether the levels share one codebook.
        generator: source of randomness of the initial codebooks.
        device: where to create the params and state.
        dtype: floating dtype of the params.
        process_group: the ranks that keep the replacement in agreement (default: world).
        dropout_seed: seed of `dropout_generator`, the CPU generator quantizer dropout draws
            from. Give every rank the same seed (the default does): each draw consumes the same
            amount of its stream whatever the local batch size, so the ranks draw the same
            depths step after step (with `dropout_per="batch"`, one depth for the whole global
            batch). The generator's position is not part of `state_dict`.
        **options: every other field of `vqfunc.residual.ResidualConfig` (`levels`, `dim`,
            `beta`, `affine_lr`, `affine_groups`, `sync_nu`, `estimator`, `replace_freq`,
            `replace_rho`, `replace_rule`, `replace_threshold`, `replace_usage`,
            `replace_decay`, `ema_decay`, `ema_eps`, `kmeans_init`, `quantizer_dropout`,
            `dropout_per`, `codebook_dim`, `dist`, `channel_groups`), with its default.
    """

    cfg: ResidualConfig
    replace_counters: Tensor
    replace_usage: Tensor
    ema_counts: Tensor
    ema_sums: Tensor

    @with_config_signature(ResidualConfig)
    def __init__(
        self,
        feature_size: int,
        num_codes: int,
        groups: int = 1,
        share: bool = True,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        process_group: ProcessGroup | None = None,
        dropout_seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__()
        levels = options.pop("levels", 1)
        if groups != 1 and levels not in (1, groups):
            raise ValueError(
                f"ResidualVectorQuantize: groups={groups} and levels={levels} both give the "
                "number of residual levels and disagree; pass only one of them"
            )
        arguments = {"feature_size": feature_size, "num_codes": num_codes, "share": share}
        arguments["levels"] = groups if groups != 1 else levels
        self.cfg = config_from_arguments(ResidualConfig, type(self).__name__, arguments | options)
        params = init_params(self.cfg, generator=generator, device=device, dtype=dtype)
        self.process_group = process_group
        if not isinstance(dropout_seed, int) or isinstance(dropout_seed, bool):
            raise TypeError(
                f"ResidualVectorQuantize: dropout_seed must be an int, got {dropout_seed!r}"
            )
        self.dropout_generator = torch.Generator().manual_seed(dropout_seed)
        # With EMA the averages own the codebook: no gradient, so no optimizer moves it as well.
        self._register_tensors(
            params, init_state(params, self.cfg), frozen_codebook=self.cfg.ema_decay > 0
        )

    @property
    def params(self) -> Any:
        """The layer's parameters: a `VQParams`, or a `ResidualParams` with `codebook_dim`
        (the layer's own tensors, not copies)."""
        base = super().params
        if self.cfg.codebook_dim is None:
            return base
        extra = (getattr(self, name) for name in self.cfg.projection_shapes)
        return ResidualParams(*base, *extra)

    @property
    def groups(self) -> int:
        """`cfg.levels`: the number of residual levels, under vqtorch's name for it."""
        return self.cfg.levels

    @property
    def levels(self) -> int:
        """`cfg.levels`: the number of residual levels."""
        return self.cfg.levels

    @property
    def state(self) -> ResidualState:
        """The layer's training state as a `ResidualState` (its own buffer, not a copy)."""
        return self._state_view()

    def _initial_state(self, params: VQParams | ResidualParams) -> ResidualState:
        return init_state(params, self.cfg)

    @torch.no_grad()
    def load_params(self, params: VQParams | ResidualParams) -> None:
        """Copy `params` into the layer's parameters (shapes must match).

        With EMA on, the EMA statistics restart from the new codebooks (one pseudo-observation
        per code), so that the averages do not pull them back to the old codes.
        """
        self._copy_params(params)
        if self.cfg.ema_decay > 0:
            self._write(None, self.state._replace(ema=init_state(self.params, self.cfg).ema))

    def _fit_for_kmeans_init(self, *args: Any, **kwargs: Any) -> Any:
        """`kmeans_init` fits the codebooks of every level (and of every channel group)."""
        return fit_stacks(*args, **kwargs)

    @torch.no_grad()
    def load_state(self, state: ResidualState) -> None:
        """Copy `state` into the layer's buffer (shapes must match)."""
        check_residual_state(
            state, self.params, self.cfg, where="ResidualVectorQuantize.load_state"
        )
        self._write(None, state)

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        n_levels: int | None = None,
        depth: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Any]]:
        """Quantize `x` (`[..., F (at dim), ...]`); see `vqfunc.residual.quantize`.

        `n_levels` runs only the first `n` levels, in training as in eval (the codes have `n`
        entries; replacement leaves the other levels as they are). In training mode with
        `quantizer_dropout > 0` the layer draws each sample's depth from
        `dropout_generator` (`vqfunc.residual.draw_dropout`; samples are the first axis of
        `x` without its feature axis); `eval()` never drops. `depth` gives the depths instead
        (in any mode): pass it pre-drawn to run the layer under
        `torch.compile(fullgraph=True)`, whose graphs draw nothing.

        Inside `vqfunc.no_vq` the layer returns `x` unchanged with a zero loss.
        """
        if not self._quantizing():
            return x, {"loss": x.new_zeros(())}
        training = self.training and self._holds_own_tensors()
        if training and self.cfg.kmeans_init and not self._kmeans_initialized():
            self._kmeans_warmup(x, mask)
        if depth is None and self.training and self.cfg.quantizer_dropout > 0:
            depth = self._draw_depth(x, n_levels)
        updates = training and (self.cfg.replaces_codes or self.cfg.ema_decay > 0)
        z_q, out = self._quantize_and_update(
            quantize, update_state, x, mask, updates=updates, n_levels=n_levels, depth=depth
        )
        return z_q, residual_misc_dict(out)

    def _draw_depth(self, x: Tensor, n_levels: int | None) -> Tensor:
        """`[S, 1, ...]` depths for the samples of `x` (broadcast over the other batch axes)."""
        dim = check_input(x, self.cfg, where="ResidualVectorQuantize")
        batch = [size for axis, size in enumerate(x.shape) if axis != dim]
        samples = batch[0] if batch else 1
        depth = draw_dropout(
            self.cfg, samples, n_levels=n_levels, generator=self.dropout_generator, device=x.device
        )
        if not batch:
            return depth.reshape(())
        return depth.view(samples, *([1] * (len(batch) - 1)))

    def extra_repr(self) -> str:
        c = self.cfg
        text = describe(
            c,
            ("feature_size", "num_codes", "levels", "share", "dim"),
            (
                "affine_lr",
                "sync_nu",
                "replace_freq",
                "replace_threshold",
                "ema_decay",
                "quantizer_dropout",
                "codebook_dim",
            ),
        )
        if c.estimator != "ste":
            text += f", estimator={c.estimator!r}"
        if c.replace_rule != "lru":
            text += f", replace_rule={c.replace_rule!r}, replace_usage={c.replace_usage!r}"
        if c.kmeans_init:
            text += ", kmeans_init=True"
        if c.channel_groups > 1:
            text += f", channel_groups={c.channel_groups}"
        return text


def residual_misc_dict(out: ResidualOutput) -> dict[str, Any]:
    """vqtorch's `misc` dictionary for a `ResidualOutput` (with vqtorch's key aliases)."""
    return misc_with_aliases(out, q="codes", d="distances", z_q="codewords", z_res="residuals")
