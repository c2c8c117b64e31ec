"""vqtorch's public API on vqfunc's core: replace `vqtorch` by `vqfunc.vqtorch` in the imports.

    import vqfunc.vqtorch as vqtorch
    from vqfunc.vqtorch.nn import VectorQuant, GroupVectorQuant, ResidualVectorQuant

The package mirrors vqtorch's module tree (`nn`, `nn.utils`, `utils`, `norms`, `dists`,
`math_fns`) with vqtorch's names, arguments, defaults, attributes, `misc` layout and
`state_dict` keys: a vqtorch checkpoint loads with `strict=True`, one saved here loads into
vqtorch, and the same codebook and input give the same codes, outputs, loss and gradients,
step after step in training (the same seed also gives the same initial codebook and the same
replacement draws). The layers are adapters over vqfunc's functional core (`vqfunc.quantize`,
`vqfunc.residual.quantize`, the replacement step and k-means of `vqfunc`).

For new code, vqfunc's own `vqfunc.nn.VectorQuantize` keeps its cleaner conventions
(group-local codes, `[groups, K, d]` codebooks, no trailing code axis) and offers more (masks,
EMA codebooks, the functional form, `torch.distributed`); `docs/migration.md` compares them.

Where vqtorch is broken, this package does the right thing in a form vqtorch code accepts:

- `misc["perplexity"]` is a number (the perplexity of the batch's codes over all codebook
  rows), not None;
- `misc["loss"]` is a scalar mean for every layer (vqtorch returns one value per batch element
  for the grouped and residual layers); `misc["loss"].mean()` still works;
- the cosine search works: `dists.cosine_cdist_topk` (vqtorch's raises `NameError`) returns the
  dictionary of `euclidean_cdist_topk`; a layer whose `dist_fn` is set to it (from
  `dists.get_dist_fns("cosine")`) quantizes by cosine similarity, with vqfunc's cosine
  semantics (unit vectors and codes);
- half-precision inputs work on CPU (ranked in float32), and `z_q` keeps the input's dtype;
- `kmeans_init` runs on CPU or GPU with vqfunc's k-means (vqtorch needs CUDA and torchpq);
  the codebook keeps its size when the first batch has fewer vectors than codes (vqtorch
  shrinks it when the numbers do not divide), and subclasses of the layers are warmed up too;
- `inplace_optimizer` works together with `affine_lr` (vqtorch's backward fails: it reuses the
  affine codebook of the graph its in-place step freed): the updated codes are recomputed
  through the affine map; it works under `torch.no_grad()` in training mode (vqtorch's step
  calls `backward()` there and fails); it leaves no gradient on the affine parameters and
  keeps the codebook's accumulated gradient (vqtorch's `zero_grad` drops it);
- `inplace_optimizer` on `GroupVectorQuant` and `ResidualVectorQuant` steps the layer's real
  codebook (vqtorch builds the optimizer over the plain codebook that the grouped one then
  replaces, so its step does nothing), with one step per forward pass on the mean over groups
  (levels) of the squared error between each code and the vector it was searched for;
- `ResidualVectorQuant(share=False)` does not require `feature_size` to be a multiple of the
  number of levels (vqtorch's check, copied from the grouped layer, serves no purpose there);
- `get_codebook()` of a grouped layer with `share=False` and `affine_groups > 1` applies the
  affine blocks per group as the forward pass does (vqtorch's applies them over all rows);
- with `affine_lr > 0`, a training step on which the k-means warm-up rewrites the codebook
  back-propagates through the codes the forward pass used (vqtorch's grouped and residual
  layers with `share=False` rewrite them under the graph);
- a layer switched off (`enabled=False`, `no_vq`) in training mode skips its k-means and
  replacement hooks (vqtorch's raise `KeyError` on the empty `misc`);
- `no_vq()` works without arguments, as vqtorch's README writes it (every VQ layer is
  switched off), and restores each layer's previous setting on exit (vqtorch sets them all
  to True);
- `requires_grad` and `set_requires_grad` work (vqtorch's index the `nn.Embedding`);
- `nn.MaxVecPool2d` and `nn.SoftMaxVecPool2d` are in `nn`, as vqtorch's README names them
  (vqtorch has them in `nn.pool` only), and take a dilation;
- `math_fns.entropy` keeps the axes in order for every `dim`;
- `ReplaceLRU` accepts `rho=0` (no noise: the default of its own `apply`) and a period of 1;
- an unknown `cb_norm` is an error (vqtorch ignores it), and every error names the value;
- nothing is printed (vqtorch's grouped k-means warm-up prints the codebook's shape).

Not supported: a `ResidualVectorQuant` whose `affine_transform` is replaced by an
`AffineTransform` in running-statistics mode (vqtorch's layers never build one; the residual
core does not expose each level's residual before that level's search) raises
`NotImplementedError`. The grouped and plain layers support it.
"""

from vqfunc.vqtorch import dists as dists
from vqfunc.vqtorch import math_fns as math_fns
from vqfunc.vqtorch import nn as nn
from vqfunc.vqtorch import norms as norms
from vqfunc.vqtorch import utils as utils
from vqfunc.vqtorch.math_fns import entropy as entropy
from vqfunc.vqtorch.nn import AffineTransform as AffineTransform
from vqfunc.vqtorch.nn import GroupVectorQuant as GroupVectorQuant
from vqfunc.vqtorch.nn import ResidualVectorQuant as ResidualVectorQuant
from vqfunc.vqtorch.nn import VectorQuant as VectorQuant
from vqfunc.vqtorch.utils import get_vq_layers as get_vq_layers
from vqfunc.vqtorch.utils import is_vq as is_vq
from vqfunc.vqtorch.utils import is_vqn as is_vqn
from vqfunc.vqtorch.utils import no_vq as no_vq

__all__ = [
    "AffineTransform",
    "GroupVectorQuant",
    "ResidualVectorQuant",
    "VectorQuant",
    "dists",
    "entropy",
    "get_vq_layers",
    "is_vq",
    "is_vqn",
    "math_fns",
    "nn",
    "no_vq",
    "norms",
    "utils",
]
