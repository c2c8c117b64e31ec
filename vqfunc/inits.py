"""`codebook_warmup`, at the import path vqtorch's README documents.

`from vqfunc.inits import codebook_warmup` is the same function as `vqfunc.nn.codebook_warmup`.
"""

from vqfunc.nn._codebook_warmup import codebook_warmup as codebook_warmup

__all__ = ["codebook_warmup"]
