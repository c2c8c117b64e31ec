"""The `nn.Module` world: layers over the pure core, and the tools that act on models.

`VectorQuantize` and `ResidualVectorQuantize` hold their params and state as parameters and
buffers and are the library's only place of mutation; `codebook_warmup` warms every VQ layer of
a model from data; `no_vq` turns layers into identities. vqtorch's classes, under its
names and conventions, are in `vqfunc.vqtorch`.
The pure core never imports this package.
"""

from vqfunc.nn._codebook_warmup import codebook_warmup as codebook_warmup
from vqfunc.nn._fsq import FSQ as FSQ
from vqfunc.nn._fsq import ResidualFSQ as ResidualFSQ
from vqfunc.nn._lfq import LFQ as LFQ
from vqfunc.nn._lfq import ResidualLFQ as ResidualLFQ
from vqfunc.nn._no_vq import no_vq as no_vq
from vqfunc.nn._residual_vector_quantize import ResidualVectorQuantize as ResidualVectorQuantize
from vqfunc.nn._vector_quantize import VectorQuantize as VectorQuantize

__all__ = [
    "FSQ",
    "LFQ",
    "ResidualFSQ",
    "ResidualLFQ",
    "ResidualVectorQuantize",
    "VectorQuantize",
    "codebook_warmup",
    "no_vq",
]
