"""vqfunc: vector quantization for PyTorch with a functional, JAX-style core."""

from vqfunc import checkpoint as checkpoint
from vqfunc import distributed as distributed
from vqfunc.aliases import GroupVectorQuant as GroupVectorQuant
from vqfunc.aliases import ResidualVectorQuant as ResidualVectorQuant
from vqfunc.aliases import VectorQuant as VectorQuant
from vqfunc.alternating import alternating_step as alternating_step
from vqfunc.alternating import codebook_loss as codebook_loss
from vqfunc.config import VQConfig as VQConfig
from vqfunc.ema import EMAState as EMAState
from vqfunc.ema import EMAStatistics as EMAStatistics
from vqfunc.ema import ema_statistics as ema_statistics
from vqfunc.ema import ema_update as ema_update
from vqfunc.ema import init_ema_state as init_ema_state
from vqfunc.inits import codebook_warmup as codebook_warmup
from vqfunc.losses import commitment_loss as commitment_loss
from vqfunc.metrics import code_histogram as code_histogram
from vqfunc.metrics import perplexity as perplexity
from vqfunc.metrics import usage as usage
from vqfunc.nn import VectorQuantize as VectorQuantize
from vqfunc.nn_residual import ResidualVectorQuantize as ResidualVectorQuantize
from vqfunc.no_vq import no_vq as no_vq
from vqfunc.params import VQParams as VQParams
from vqfunc.params import init_params as init_params
from vqfunc.quantize import QuantizeOutput as QuantizeOutput
from vqfunc.quantize import dequantize as dequantize
from vqfunc.quantize import quantize as quantize
from vqfunc.replace import Candidates as Candidates
from vqfunc.replace import ReplaceRandomness as ReplaceRandomness
from vqfunc.replace import ReplaceState as ReplaceState
from vqfunc.replace import draw_replace_randomness as draw_replace_randomness
from vqfunc.replace import init_replace_state as init_replace_state
from vqfunc.replace import replace_dead_codes as replace_dead_codes
from vqfunc.replace import sample_candidates as sample_candidates
from vqfunc.residual import ResidualConfig as ResidualConfig
from vqfunc.residual import ResidualOutput as ResidualOutput
from vqfunc.residual import init_residual_params as init_residual_params
from vqfunc.residual import residual_dequantize as residual_dequantize
from vqfunc.residual import residual_quantize as residual_quantize
from vqfunc.residual import residual_warmup_params as residual_warmup_params
from vqfunc.state import VQState as VQState
from vqfunc.state import init_state as init_state
from vqfunc.state import update_state as update_state
from vqfunc.warmup import warmup_params as warmup_params

__version__ = "0.1.0"
