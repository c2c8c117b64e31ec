"""`vqtorch.nn`: vqtorch's layers (`VectorQuant`, `GroupVectorQuant`, `ResidualVectorQuant`),
their base class `_VQBaseLayer`, `AffineTransform`, the vector pooling layers and `utils`."""

from vqfunc.vqtorch.nn import affine as affine
from vqfunc.vqtorch.nn import gvq as gvq
from vqfunc.vqtorch.nn import pool as pool
from vqfunc.vqtorch.nn import rvq as rvq
from vqfunc.vqtorch.nn import utils as utils
from vqfunc.vqtorch.nn import vq as vq
from vqfunc.vqtorch.nn import vq_base as vq_base
from vqfunc.vqtorch.nn.affine import AffineTransform as AffineTransform
from vqfunc.vqtorch.nn.gvq import GroupVectorQuant as GroupVectorQuant
from vqfunc.vqtorch.nn.pool import MaxVecPool2d as MaxVecPool2d
from vqfunc.vqtorch.nn.pool import SoftMaxVecPool2d as SoftMaxVecPool2d
from vqfunc.vqtorch.nn.rvq import ResidualVectorQuant as ResidualVectorQuant
from vqfunc.vqtorch.nn.vq import VectorQuant as VectorQuant
from vqfunc.vqtorch.nn.vq_base import _VQBaseLayer as _VQBaseLayer

__all__ = [
    "AffineTransform",
    "GroupVectorQuant",
    "MaxVecPool2d",
    "ResidualVectorQuant",
    "SoftMaxVecPool2d",
    "VectorQuant",
    "_VQBaseLayer",
    "affine",
    "gvq",
    "pool",
    "rvq",
    "utils",
    "vq",
    "vq_base",
]
