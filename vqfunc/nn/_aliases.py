"""vqtorch's layer names, so that code written for vqtorch runs with an import changed.

`from vqfunc.nn import VectorQuant, GroupVectorQuant, ResidualVectorQuant` accepts vqtorch's
arguments as written, including `groups` and `share` as the third and fourth positional
arguments of the grouped and residual layers.

Where vqfunc differs from vqtorch on purpose:
- codes of a plain layer have the input's shape minus `dim` (vqtorch adds a trailing axis of
  size 1);
- with `share=False`, codes index the group's (or level's) own codebook, and the codebook is
  stored as `[groups, num_codes // groups, d]` (vqtorch: flat rows with a block offset);
- `misc["loss"]` is always a scalar mean and `misc["perplexity"]` a number.
"""

from __future__ import annotations

from typing import Any

from vqfunc._config import VQConfig
from vqfunc.nn._config_arguments import with_config_signature
from vqfunc.nn._residual_vector_quantize import ResidualVectorQuantize
from vqfunc.nn._vector_quantize import VectorQuantize

VectorQuant = VectorQuantize
"""vqtorch's name of `VectorQuantize`."""

ResidualVectorQuant = ResidualVectorQuantize
"""vqtorch's name of `ResidualVectorQuantize` (`groups` is the number of residual levels)."""


class GroupVectorQuant(VectorQuantize):
    """vqtorch's grouped layer: `VectorQuantize` with `groups` and `share` also positional."""

    @with_config_signature(VQConfig)
    def __init__(
        self,
        feature_size: int,
        num_codes: int,
        groups: int = 1,
        share: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(feature_size, num_codes, groups=groups, share=share, **kwargs)
