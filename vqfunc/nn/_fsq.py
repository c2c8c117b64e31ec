"""`FSQ` and `ResidualFSQ`: layers over `vqfunc.fsq`, without parameters or state."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from vqfunc.fsq import FSQConfig, ResidualFSQConfig, quantize, quantize_residual
from vqfunc.nn._base import describe
from vqfunc.nn._config_arguments import config_from_arguments, with_config_signature
from vqfunc.nn._no_vq import switched_off


class FSQ(nn.Module):
    """A finite scalar quantization layer (see `vqfunc.fsq`).

    `z_q, misc = layer(z_e)`: `z_q` has `z_e`'s shape and dtype; `misc` holds the fields of
    `vqfunc.fsq.FSQOutput` (`"codes"`, `"bounded"`, `"perplexity"`, `"usage"`,
    `"histogram"`) and `"loss"`, a zero (FSQ has no auxiliary loss). `layer(z_e, mask=m)`
    takes a `[*B]` mask over the input's non-feature axes, excluded from the statistics.
    Any input rank >= 1 and empty batches work; the feature axis is `dim` (default 1, as
    for `VectorQuantize`). The layer holds no parameters or buffers: it is the pure function
    with its configuration.

    Args:
        levels: values per feature, e.g. `(8, 5, 5, 5)` (`prod(levels)` codes).
        **options: the other fields of `vqfunc.fsq.FSQConfig` (`dim`, `preserve_symmetry`,
            `num_codebooks`), with their defaults.
    """

    _no_vq_scoped = True  # `vqfunc.no_vq` reaches the layer through the context

    cfg: FSQConfig

    @with_config_signature(FSQConfig)
    def __init__(self, levels: tuple[int, ...], **options: Any) -> None:
        super().__init__()
        self.cfg = config_from_arguments(
            FSQConfig, type(self).__name__, {"levels": levels, **options}
        )
        self.vq_enabled = True

    def forward(self, x: Tensor, *, mask: Tensor | None = None) -> tuple[Tensor, dict[str, Any]]:
        """Quantize `x` (`[..., F (at dim), ...]`); see `vqfunc.fsq.quantize`."""
        if not self.vq_enabled or switched_off(id(self)):
            return x, {"loss": x.new_zeros(())}
        z_q, out = quantize(x, self.cfg, mask=mask)
        return z_q, {**out._asdict(), "loss": x.new_zeros(())}

    def extra_repr(self) -> str:
        optional = ("preserve_symmetry",) + (
            ("num_codebooks",) if self.cfg.num_codebooks > 1 else ()
        )
        return describe(self.cfg, ("levels", "dim"), optional)


class ResidualFSQ(nn.Module):
    """A residual finite scalar quantization layer (see `vqfunc.fsq.quantize_residual`).

    `z_q, misc = layer(z_e)`: `misc` holds the fields of `vqfunc.fsq.ResidualFSQOutput`
    (`"codes"` `[*B, num_quantizers]`, `"bounded"`, `"residuals"`, `"perplexity"`, `"usage"`,
    `"histogram"`) and `"loss"`, a zero. Masks, ranks and `dim` as for `FSQ`.

    Args:
        levels: values per feature of every stage's grid.
        **options: the other fields of `vqfunc.fsq.ResidualFSQConfig` (`dim`,
            `preserve_symmetry`, `num_quantizers`), with their defaults.
    """

    _no_vq_scoped = True  # `vqfunc.no_vq` reaches the layer through the context

    cfg: ResidualFSQConfig

    @with_config_signature(ResidualFSQConfig)
    def __init__(self, levels: tuple[int, ...], **options: Any) -> None:
        super().__init__()
        self.cfg = config_from_arguments(
            ResidualFSQConfig, type(self).__name__, {"levels": levels, **options}
        )
        self.vq_enabled = True

    def forward(self, x: Tensor, *, mask: Tensor | None = None) -> tuple[Tensor, dict[str, Any]]:
        """Quantize `x` (`[..., F (at dim), ...]`); see `vqfunc.fsq.quantize_residual`."""
        if not self.vq_enabled or switched_off(id(self)):
            return x, {"loss": x.new_zeros(())}
        z_q, out = quantize_residual(x, self.cfg, mask=mask)
        return z_q, {**out._asdict(), "loss": x.new_zeros(())}

    def extra_repr(self) -> str:
        return describe(self.cfg, ("levels", "num_quantizers", "dim", "preserve_symmetry"), ())
