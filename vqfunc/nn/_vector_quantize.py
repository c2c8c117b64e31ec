"""`VectorQuantize`: the `nn.Module` shim over the functional core.

The layer holds the params as `nn.Parameter`s named like the fields of `VQParams` and the
training state as persistent buffers named like the fields of `VQState`, calls the pure
functions, and is the library's single place of mutation. `layer.params` and `layer.state` are
views of its own tensors, and `torch.func.functional_call(layer, params._asdict(), (x,))`
equals `vqfunc.quantize(params, x, layer.cfg)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from vqfunc._alternating import codebook_loss
from vqfunc._config import VQConfig
from vqfunc._ema import init_ema_state
from vqfunc._params import AnyParams, VQParams, init_params
from vqfunc._quantize import QuantizeOutput, quantize
from vqfunc._state import VQState, check_state, init_state, update_state
from vqfunc.distributed import sync_for
from vqfunc.nn._base import QuantizerShim, describe, misc_with_aliases
from vqfunc.nn._config_arguments import config_from_arguments, with_config_signature

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

InplaceOptimizer = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class VectorQuantize(QuantizerShim):
    """A vector-quantization layer with vqtorch's arguments and vqfunc's conventions.

    `z_q, misc = layer(z_e)`: `z_q` has `z_e`'s shape and dtype; `misc["loss"]` is the
    commitment loss; `misc` also holds `"codes"` (alias `"q"`), `"distances"` (alias `"d"`),
    `"perplexity"`, `"z"`, `"z_q"` and `"histogram"` (see `QuantizeOutput`).
    `layer.feature_size`, `num_codes`, `dim`, `groups` and `beta` read `layer.cfg`;
    `layer.get_codebook()` gives the effective codes. For vqtorch's own layout of codes,
    `misc` and `state_dict`, use `vqfunc.vqtorch.nn.VectorQuant`.
    `layer(z_e, mask=m)` takes a `[*B]` mask over the input's non-feature axes: masked
    positions are quantized but count in no loss, statistic or replacement.

    Args:
        feature_size: size `F` of the quantized axis `dim`.
        num_codes: number of codes (with `share=False`, of all groups together).
        inplace_optimizer: e.g. `lambda p: torch.optim.SGD(p, lr=50.0, momentum=0.9)`: one
            codebook step before each training forward pass (see below).
        generator: source of randomness of the initial codebook (see `vqfunc.init_params`).
        device: where to create the params and state.
        dtype: floating dtype of the params.
        process_group: the `torch.distributed` group whose ranks keep identical codebooks
            (default: the world group, when initialised).
        **options: every other field of `vqfunc.VQConfig` (`dim`, `dist`, `vector_normalize`,
            `groups`, `share`, `beta`, `affine_lr`, `affine_groups`, `sync_nu`,
            `estimator`, `replace_freq`, `replace_rho`, `replace_rule`,
            `replace_threshold`, `replace_usage`, `replace_decay`, `ema_decay`, `ema_eps`,
            `kmeans_init`), with its default.

    Under `torch.distributed` (e.g. with DistributedDataParallel), every data-dependent update
    of the training mode (k-means warm-up, EMA, dead-code replacement, the in-place codebook
    step) agrees across the ranks of `process_group` (default: the world group); see
    `vqfunc.distributed`. Every rank must run the same number of training forward passes.
    Without an initialised process group no collective is issued.

    Training (`layer.train()`) runs the stateful techniques inside `forward`, as vqtorch does:

    - `kmeans_init=True`: the first training batch warms the codebook with k-means
      (`warmup_params(method="kmeans")`), once; the buffer `kmeans_initialized` records it.
    - `inplace_optimizer` (e.g. `lambda p: torch.optim.SGD(p, lr=50.0, momentum=0.9)`): before
      quantizing, one step of that optimizer on the codebook loss `mse(sg(z), C[q])`
      (`vqfunc.alternating_step`); the batch is then quantized with the updated codebook. The
      codebook's accumulated `.grad` is left as it was. The optimizer's own state (e.g.
      momentum) is not part of `state_dict`. Unlike vqtorch, any `beta` is accepted: the
      main optimizer still applies the commitment loss's codebook term (weight `beta`).
    - `ema_decay > 0`: after quantizing, the EMA update (`vqfunc.ema_update`). The codebook is then
      moved by the averages only, so it has `requires_grad=False` and no optimizer moves it.
    - `replace_freq > 0`: after quantizing, dead-code replacement (`vqfunc.replace_dead_codes`).
    - `replace_rule="usage"`, `replace_threshold > 0`: the same, with EnCodec's or Mimi's
      rule: codes whose running average of use (the buffer `replace_usage`) is below the
      threshold are replaced (see `docs/restarts.md`).

    The returned `z_q` and `misc` are those of the codebook before the EMA update and the
    replacement, which take effect from the next batch. Randomness (k-means seeding,
    replacement candidates) comes from torch's global generator.

    The state is updated only in training mode and only on the layer's own tensors: under
    `torch.func.functional_call` with other params or buffers, or in `eval()` mode, the
    forward pass is pure. The functional form of the update is `vqfunc.update_state`.
    """

    cfg: VQConfig
    replace_counters: Tensor
    replace_usage: Tensor
    ema_counts: Tensor
    ema_sums: Tensor

    @with_config_signature(VQConfig)
    def __init__(
        self,
        feature_size: int,
        num_codes: int,
        *,
        inplace_optimizer: InplaceOptimizer | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        process_group: ProcessGroup | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.cfg = config_from_arguments(
            VQConfig,
            type(self).__name__,
            {"feature_size": feature_size, "num_codes": num_codes, **options},
        )
        if inplace_optimizer is not None and self.cfg.ema_decay > 0:
            raise ValueError(
                "VectorQuantize: inplace_optimizer and ema_decay > 0 both move the codebook; "
                "use one of them"
            )
        if inplace_optimizer is not None and not callable(inplace_optimizer):
            raise TypeError(
                "VectorQuantize: inplace_optimizer must be a callable taking the codebook "
                "parameters and returning an optimizer, e.g. "
                "lambda params: torch.optim.SGD(params, lr=50.0, momentum=0.9); "
                f"got {type(inplace_optimizer).__name__}"
            )
        params = init_params(self.cfg, generator=generator, device=device, dtype=dtype)
        # With EMA the averages own the codebook: no gradient, so no optimizer moves it as well.
        self._register_tensors(
            params, init_state(params, self.cfg), frozen_codebook=self.cfg.ema_decay > 0
        )
        self.process_group = process_group
        self.inplace_codebook_optimizer: torch.optim.Optimizer | None = None
        if inplace_optimizer is not None:
            self.inplace_codebook_optimizer = inplace_optimizer([self.codebook])

    def _initial_state(self, params: VQParams) -> VQState:
        return init_state(params, self.cfg)

    @property
    def groups(self) -> int:
        """`cfg.groups`: sub-vectors per input vector."""
        return self.cfg.groups

    @property
    def state(self) -> VQState:
        """The layer's training state as a `VQState` (its own buffers, not copies)."""
        return self._state_view()

    @torch.no_grad()
    def load_params(self, params: AnyParams) -> None:
        """Copy `params` into the layer's parameters (shapes must match).

        With EMA on, the EMA statistics restart from the new codebook (one pseudo-observation
        per code), so that the averages do not pull it back to the old codes.
        """
        self._copy_params(params)
        if self.cfg.ema_decay > 0:
            self._write(None, self.state._replace(ema=init_ema_state(self.params, self.cfg)))

    @torch.no_grad()
    def load_state(self, state: VQState) -> None:
        """Copy `state` into the layer's buffers (shapes must match)."""
        check_state(state, self.params, self.cfg, where="VectorQuantize.load_state")
        self._write(None, state)

    def forward(self, x: Tensor, *, mask: Tensor | None = None) -> tuple[Tensor, dict[str, Any]]:
        """Quantize `x` (`[..., F (at dim), ...]`); see `vqfunc.quantize` and the class doc.

        Args:
            x: the input, with `feature_size` features on `dim`.
            mask: optional `[*B]` (bool or float) mask over the input's non-feature axes.
        """
        if not self._quantizing():
            return x, {"loss": x.new_zeros(())}
        training = self.training and self._holds_own_tensors()
        if training and self.cfg.kmeans_init and not self._kmeans_initialized():
            self._kmeans_warmup(x, mask)
        if training and self.inplace_codebook_optimizer is not None:
            self._inplace_step(x, mask)
        updates = training and (self.cfg.ema_decay > 0 or self.cfg.replaces_codes)
        z_q, out = self._quantize_and_update(quantize, update_state, x, mask, updates=updates)
        return z_q, misc_dict(out)

    def _inplace_step(self, x: Tensor, mask: Tensor | None) -> None:
        optimizer = self.inplace_codebook_optimizer
        assert optimizer is not None
        with torch.no_grad():
            _, out = quantize(self.params, x, self.cfg, mask=mask)
        with torch.enable_grad():
            loss = codebook_loss(self.params, out.z, out.codes, self.cfg, mask=mask)
            (grad,) = torch.autograd.grad(loss, [self.codebook])
        sync = sync_for(self.process_group)
        if sync is not None:  # the replicas take the same step, as DDP would average it
            grad = sync.reduce_mean(grad)
        # The task's accumulated gradient is set aside, not consumed by this step.
        saved = self.codebook.grad
        self.codebook.grad = grad
        try:
            optimizer.step()
        finally:
            self.codebook.grad = saved

    def extra_repr(self) -> str:
        c = self.cfg
        leading: tuple[str, ...] = ("feature_size", "num_codes", "dist", "dim")
        if c.groups > 1:
            leading += ("groups", "share")
        optional = (
            "affine_lr", "sync_nu", "replace_freq", "replace_threshold", "ema_decay", "kmeans_init"
        )  # fmt: skip
        text = describe(c, leading, optional)
        if c.replace_rule != "lru":
            text += f", replace_rule={c.replace_rule!r}, replace_usage={c.replace_usage!r}"
        return text


def misc_dict(out: QuantizeOutput) -> dict[str, Any]:
    """vqtorch's `misc` dictionary for a `QuantizeOutput` (with vqtorch's key aliases)."""
    return misc_with_aliases(out, q="codes", d="distances", z_q="codewords")
