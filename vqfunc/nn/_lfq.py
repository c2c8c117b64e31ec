"""`LFQ` and `ResidualLFQ`: layers over `vqfunc.lfq`, without parameters or state."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from vqfunc.distributed import sync_for
from vqfunc.lfq import LFQConfig, ResidualLFQConfig, quantize, quantize_residual
from vqfunc.nn._base import describe
from vqfunc.nn._config_arguments import config_from_arguments, with_config_signature
from vqfunc.nn._no_vq import switched_off

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

_OPTIONAL = ("spherical", "entropy_weight", "commitment_weight")


class LFQ(nn.Module):
    """A lookup-free (or, with `spherical=True`, binary spherical) quantization layer (see
    `vqfunc.lfq`).

    `z_q, misc = layer(z_e)`: `z_q` has `z_e`'s shape and dtype; `misc` holds the fields of
    `vqfunc.lfq.LFQOutput`: `"codes"`, `"loss"` (the entropy and commitment loss, to add to
    the task loss), `"per_sample_entropy"`, `"codebook_entropy"`, `"commitment"`, `"z"`,
    `"perplexity"`, `"usage"`, `"histogram"`. `layer(z_e, mask=m)` takes a `[*B]` mask over
    the input's non-feature axes, excluded from every loss term and statistic. Any input
    rank >= 1 and empty batches work; the feature axis is `dim` (default 1, as for
    `VectorQuantize`). The layer holds no parameters or buffers.

    In training mode under `torch.distributed` (e.g. with DistributedDataParallel), the batch
    statistics of the loss are summed over the ranks of `process_group` (one collective per
    forward pass; see `vqfunc.lfq.quantize`'s `sync=`), so that every rank computes the same
    loss; every rank must then run the same number of training forward passes. In eval mode
    the loss is each rank's own and no collective runs.

    Args:
        bits: number of features and code bits (`2**bits` codes).
        process_group: the ranks that share the batch statistics (default: the world group,
            when initialised).
        **options: the other fields of `vqfunc.lfq.LFQConfig` (`dim`, `entropy_weight`,
            `diversity_gamma`, `commitment_weight`, `inv_temperature`, `spherical`,
            `scale`), with their defaults.
    """

    _no_vq_scoped = True  # `vqfunc.no_vq` reaches the layer through the context

    cfg: LFQConfig

    @with_config_signature(LFQConfig)
    def __init__(
        self, bits: int, *, process_group: ProcessGroup | None = None, **options: Any
    ) -> None:
        super().__init__()
        self.cfg = config_from_arguments(LFQConfig, type(self).__name__, {"bits": bits, **options})
        self.process_group = process_group
        self.vq_enabled = True

    def forward(self, x: Tensor, *, mask: Tensor | None = None) -> tuple[Tensor, dict[str, Any]]:
        """Quantize `x` (`[..., F (at dim), ...]`); see `vqfunc.lfq.quantize`."""
        if not self.vq_enabled or switched_off(id(self)):
            return x, {"loss": x.new_zeros(())}
        sync = sync_for(self.process_group) if self.training else None
        z_q, out = quantize(x, self.cfg, mask=mask, sync=sync)
        return z_q, out._asdict()

    def extra_repr(self) -> str:
        return describe(self.cfg, ("bits", "dim", "inv_temperature"), _OPTIONAL)


class ResidualLFQ(nn.Module):
    """A residual lookup-free quantization layer (see `vqfunc.lfq.quantize_residual`).

    `z_q, misc = layer(z_e)`: `misc` holds the fields of `vqfunc.lfq.ResidualLFQOutput`
    (`"codes"` `[*B, num_quantizers]`, `"loss"`, the per-stage `"per_sample_entropy"` and
    `"codebook_entropy"`, `"commitment"`, `"z"`, `"residuals"`, `"perplexity"`, `"usage"`,
    `"histogram"`). Masks, ranks, `dim` and `torch.distributed` as for `LFQ`.

    Args:
        bits: number of features and code bits of every stage.
        process_group: the ranks that share the batch statistics (default: the world group,
            when initialised).
        **options: the other fields of `vqfunc.lfq.ResidualLFQConfig` (those of `LFQ` and
            `num_quantizers`), with their defaults.
    """

    _no_vq_scoped = True  # `vqfunc.no_vq` reaches the layer through the context

    cfg: ResidualLFQConfig

    @with_config_signature(ResidualLFQConfig)
    def __init__(
        self, bits: int, *, process_group: ProcessGroup | None = None, **options: Any
    ) -> None:
        super().__init__()
        self.cfg = config_from_arguments(
            ResidualLFQConfig, type(self).__name__, {"bits": bits, **options}
        )
        self.process_group = process_group
        self.vq_enabled = True

    def forward(self, x: Tensor, *, mask: Tensor | None = None) -> tuple[Tensor, dict[str, Any]]:
        """Quantize `x` (`[..., F (at dim), ...]`); see `vqfunc.lfq.quantize_residual`."""
        if not self.vq_enabled or switched_off(id(self)):
            return x, {"loss": x.new_zeros(())}
        sync = sync_for(self.process_group) if self.training else None
        z_q, out = quantize_residual(x, self.cfg, mask=mask, sync=sync)
        return z_q, out._asdict()

    def extra_repr(self) -> str:
        return describe(self.cfg, ("bits", "num_quantizers", "dim", "inv_temperature"), _OPTIONAL)
