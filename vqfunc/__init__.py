"""vqfunc: vector quantization for PyTorch with a functional, JAX-style core."""

from vqfunc.config import VQConfig as VQConfig
from vqfunc.inits import codebook_warmup as codebook_warmup
from vqfunc.losses import commitment_loss as commitment_loss
from vqfunc.metrics import code_histogram as code_histogram
from vqfunc.metrics import perplexity as perplexity
from vqfunc.metrics import usage as usage
from vqfunc.nn import VectorQuantize as VectorQuantize
from vqfunc.params import VQParams as VQParams
from vqfunc.params import init_params as init_params
from vqfunc.quantize import QuantizeOutput as QuantizeOutput
from vqfunc.quantize import dequantize as dequantize
from vqfunc.quantize import quantize as quantize
from vqfunc.warmup import warmup_params as warmup_params

__version__ = "0.1.0"
