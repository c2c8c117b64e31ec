"""`vqtorch.nn.utils`: dead-code replacement (`lru_replacement`, `ReplaceLRU`) and the
k-means warm-up hook (`init`)."""

from vqfunc.vqtorch.nn.utils import init as init
from vqfunc.vqtorch.nn.utils import replace as replace
from vqfunc.vqtorch.nn.utils.replace import ReplaceLRU as ReplaceLRU
from vqfunc.vqtorch.nn.utils.replace import lru_replacement as lru_replacement

__all__ = ["ReplaceLRU", "init", "lru_replacement", "replace"]
