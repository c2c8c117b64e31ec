"""Finite scalar quantization (FSQ; Mentzer et al., 2023): quantizers without a codebook.

Every feature is bounded and rounded to a fixed grid of `levels[j]` values; the codes are the
`prod(levels)` points of that grid. The same pure shape as the rest of the library, without
params or state:

    cfg = vqfunc.fsq.FSQConfig(levels=(8, 5, 5, 5), dim=-1)     # 1000 codes on 4 features
    z_q, out = vqfunc.fsq.quantize(x, cfg)                      # out.codes: [*B] int64
    x_hat = vqfunc.fsq.dequantize(out.codes, cfg)               # == z_q (float32 inputs)

    rcfg = vqfunc.fsq.ResidualFSQConfig(levels=(8, 5, 5, 5), num_quantizers=3, dim=-1)
    z_q, out = vqfunc.fsq.quantize_residual(x, rcfg)            # out.codes: [*B, 3]

The layers are `vqfunc.nn.FSQ` and `vqfunc.nn.ResidualFSQ`.
"""

from vqfunc.fsq._config import FSQConfig as FSQConfig
from vqfunc.fsq._config import ResidualFSQConfig as ResidualFSQConfig
from vqfunc.fsq._quantize import FSQOutput as FSQOutput
from vqfunc.fsq._quantize import codes_from_values as codes_from_values
from vqfunc.fsq._quantize import dequantize as dequantize
from vqfunc.fsq._quantize import implicit_codebook as implicit_codebook
from vqfunc.fsq._quantize import quantize as quantize
from vqfunc.fsq._residual import ResidualFSQOutput as ResidualFSQOutput
from vqfunc.fsq._residual import dequantize_residual as dequantize_residual
from vqfunc.fsq._residual import quantize_residual as quantize_residual

__all__ = [
    "FSQConfig",
    "FSQOutput",
    "ResidualFSQConfig",
    "ResidualFSQOutput",
    "codes_from_values",
    "dequantize",
    "dequantize_residual",
    "implicit_codebook",
    "quantize",
    "quantize_residual",
]
