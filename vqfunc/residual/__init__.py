"""Residual vector quantization: every level quantizes what the earlier levels left.

The same pure shape as plain VQ, in its own namespace:

    cfg = vqfunc.residual.ResidualConfig(feature_size=64, num_codes=1024, levels=4, dim=-1)
    params = vqfunc.residual.init_params(cfg, generator=g)
    params = vqfunc.residual.warmup_params(params, x, cfg, method="kmeans", generator=g)
    state = vqfunc.residual.init_state(params, cfg)
    z_q, out = vqfunc.residual.quantize(params, x, cfg)
    params, state = vqfunc.residual.update_state(params, state, out, cfg, generator=g)

Codec features: `n_levels=` at `quantize` / `dequantize` (fewer levels, a lower bitrate),
`num_codes=(1024, 512, 256)` (one codebook size per level), `codebook_dim=` (learned
projections around each level's lookup, `ResidualParams`; with `dist="cosine"` DAC's
factorised lookup), quantizer dropout
(`draw_dropout`, then `quantize(..., depth=)`), `bitrate(cfg, frame_rate)`, and grouped
residual VQ (`channel_groups=G`: HiFi-Codec's groups of channels, each with a residual stack
of its own, params stacked on a leading group axis).

The layer is `vqfunc.nn.ResidualVectorQuantize`.
"""

from vqfunc._params import ResidualParams as ResidualParams
from vqfunc.residual._bitrate import bitrate as bitrate
from vqfunc.residual._config import ResidualConfig as ResidualConfig
from vqfunc.residual._dropout import draw_dropout as draw_dropout
from vqfunc.residual._quantize import ResidualOutput as ResidualOutput
from vqfunc.residual._quantize import dequantize as dequantize
from vqfunc.residual._quantize import init_params as init_params
from vqfunc.residual._quantize import quantize as quantize
from vqfunc.residual._state import ResidualState as ResidualState
from vqfunc.residual._state import init_state as init_state
from vqfunc.residual._state import update_state as update_state
from vqfunc.residual._warmup import warmup_params as warmup_params

__all__ = [
    "ResidualConfig",
    "ResidualOutput",
    "ResidualParams",
    "ResidualState",
    "bitrate",
    "dequantize",
    "draw_dropout",
    "init_params",
    "init_state",
    "quantize",
    "update_state",
    "warmup_params",
]
