"""Lookup-free quantization (LFQ; Yu et al., 2023) and binary spherical quantization (BSQ;
Zhao et al., 2024): quantizers without a codebook, with exact, memory-bounded entropy terms.

Every feature is quantized by its sign; the `2**bits` codes are the corners of a cube (of the
sphere's inscribed cube for BSQ). The same pure shape as the rest of the library, without
params or state:

    cfg = vqfunc.lfq.LFQConfig(bits=10, dim=-1)                 # spherical=True for BSQ
    z_q, out = vqfunc.lfq.quantize(x, cfg, mask=m, sync=sync)   # out.loss: the aux loss
    x_hat = vqfunc.lfq.dequantize(out.codes, cfg)               # == z_q (float32 inputs)

    rcfg = vqfunc.lfq.ResidualLFQConfig(bits=10, num_quantizers=4, dim=-1)
    z_q, out = vqfunc.lfq.quantize_residual(x, rcfg)            # out.codes: [*B, 4]

vector-quantize-pytorch numbers the bits the other way round (its first feature is the most
significant bit): its index is `sum_i ((code >> i) & 1) << (bits - 1 - i)` of vqfunc's code.

The layers are `vqfunc.nn.LFQ` and `vqfunc.nn.ResidualLFQ`.
"""

from vqfunc.lfq._config import LFQConfig as LFQConfig
from vqfunc.lfq._config import ResidualLFQConfig as ResidualLFQConfig
from vqfunc.lfq._quantize import LFQOutput as LFQOutput
from vqfunc.lfq._quantize import dequantize as dequantize
from vqfunc.lfq._quantize import implicit_codebook as implicit_codebook
from vqfunc.lfq._quantize import quantize as quantize
from vqfunc.lfq._residual import ResidualLFQOutput as ResidualLFQOutput
from vqfunc.lfq._residual import dequantize_residual as dequantize_residual
from vqfunc.lfq._residual import quantize_residual as quantize_residual

__all__ = [
    "LFQConfig",
    "LFQOutput",
    "ResidualLFQConfig",
    "ResidualLFQOutput",
    "dequantize",
    "dequantize_residual",
    "implicit_codebook",
    "quantize",
    "quantize_residual",
]
