"""vqfunc: vector quantization for PyTorch with a functional, JAX-style core.

The pure core is this namespace: a frozen configuration (`VQConfig`), named tuples of tensors
for the params and the training state, and functions that return new values (`quantize`,
`dequantize`, `commitment_loss`, `warmup_params`, `init_state`, `update_state`, ...).
Residual VQ has the same shape in `vqfunc.residual`. The `nn.Module` layers live in
`vqfunc.nn` (and are re-exported here); `vqfunc.distributed` holds the collectives that keep
replicas' codebooks identical, `vqfunc.checkpoint` flat checkpoints shared by both forms.
"""

from importlib.metadata import PackageNotFoundError, version

from vqfunc import checkpoint as checkpoint
from vqfunc import distributed as distributed
from vqfunc import fsq as fsq
from vqfunc import kernels as kernels
from vqfunc import lfq as lfq
from vqfunc import nn as nn
from vqfunc import residual as residual
from vqfunc._affine import effective_codebook as effective_codebook
from vqfunc._alternating import alternating_step as alternating_step
from vqfunc._alternating import codebook_loss as codebook_loss
from vqfunc._config import CodebookLayout as CodebookLayout
from vqfunc._config import QuantizerConfig as QuantizerConfig
from vqfunc._config import VQConfig as VQConfig
from vqfunc._ema import EMAState as EMAState
from vqfunc._ema import EMAStatistics as EMAStatistics
from vqfunc._ema import ema_statistics as ema_statistics
from vqfunc._ema import ema_update as ema_update
from vqfunc._ema import init_ema_state as init_ema_state
from vqfunc._losses import commitment_loss as commitment_loss
from vqfunc._metrics import code_histogram as code_histogram
from vqfunc._metrics import perplexity as perplexity
from vqfunc._metrics import usage as usage
from vqfunc._params import VQParams as VQParams
from vqfunc._params import init_params as init_params
from vqfunc._quantize import QuantizeOutput as QuantizeOutput
from vqfunc._quantize import dequantize as dequantize
from vqfunc._quantize import quantize as quantize
from vqfunc._replace import Candidates as Candidates
from vqfunc._replace import ReplaceRandomness as ReplaceRandomness
from vqfunc._replace import ReplaceState as ReplaceState
from vqfunc._replace import draw_replace_randomness as draw_replace_randomness
from vqfunc._replace import init_replace_state as init_replace_state
from vqfunc._replace import replace_dead_codes as replace_dead_codes
from vqfunc._replace import sample_candidates as sample_candidates
from vqfunc._state import VQState as VQState
from vqfunc._state import init_state as init_state
from vqfunc._state import update_state as update_state
from vqfunc._warmup import warmup_params as warmup_params
from vqfunc.nn import FSQ as FSQ
from vqfunc.nn import LFQ as LFQ
from vqfunc.nn import ResidualFSQ as ResidualFSQ
from vqfunc.nn import ResidualLFQ as ResidualLFQ
from vqfunc.nn import ResidualVectorQuantize as ResidualVectorQuantize
from vqfunc.nn import VectorQuantize as VectorQuantize
from vqfunc.nn import codebook_warmup as codebook_warmup
from vqfunc.nn import no_vq as no_vq

try:
    __version__ = version("vqfunc")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "FSQ",
    "LFQ",
    "Candidates",
    "CodebookLayout",
    "EMAState",
    "EMAStatistics",
    "QuantizeOutput",
    "QuantizerConfig",
    "ReplaceRandomness",
    "ReplaceState",
    "ResidualFSQ",
    "ResidualLFQ",
    "ResidualVectorQuantize",
    "VQConfig",
    "VQParams",
    "VQState",
    "VectorQuantize",
    "alternating_step",
    "checkpoint",
    "code_histogram",
    "codebook_loss",
    "codebook_warmup",
    "commitment_loss",
    "dequantize",
    "distributed",
    "draw_replace_randomness",
    "effective_codebook",
    "ema_statistics",
    "ema_update",
    "fsq",
    "init_ema_state",
    "init_params",
    "init_replace_state",
    "init_state",
    "kernels",
    "lfq",
    "nn",
    "perplexity",
    "quantize",
    "replace_dead_codes",
    "residual",
    "sample_candidates",
    "update_state",
    "usage",
    "warmup_params",
]
