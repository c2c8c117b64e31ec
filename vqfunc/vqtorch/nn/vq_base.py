"""`vqtorch.nn.vq_base`: `_VQBaseLayer`, the base class of vqtorch's VQ layers.

It holds what every layer shares: the sizes, the feature axis `dim`, the input normalisation
(`norm_layer`, from `vqfunc.vqtorch.norms.get_norm`), the codebook normalisation's name
(`codebook_norm`), the k-means flag (the buffer `data_initialized` and its forward hook, with
`kmeans_init=True`), and the layout conversions: `prepare_inputs` moves `dim` last, splits the
features into `[groups, feature_size // groups]` and normalises; `to_original_format` undoes
the move. `is_vq` recognises a layer by this base class.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vqfunc.vqtorch.nn.utils.init import data_dependent_init_forward_hook
from vqfunc.vqtorch.norms import CODEBOOK_NORMS, get_norm

__all__ = ["_VQBaseLayer"]


def _check_size(owner: str, name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


class _VQBaseLayer(nn.Module):
    """Base of vqtorch's VQ layers (`VectorQuant`, `GroupVectorQuant`, `ResidualVectorQuant`).

    Args:
        feature_size: size of the quantized axis `dim` of the input.
        num_codes: number of codes in the codebook.
        dim: the feature axis (default 1: `[B, C, H, W]` images; use 2 or -1 for `[B, N, C]`).
            The codes `q` then have the input's shape without `dim`, plus a trailing axis of
            size `groups`.
        norm: input normalisation, one of `vqfunc.vqtorch.norms.NORMS`.
        cb_norm: codebook normalisation, one of `vqfunc.vqtorch.norms.CODEBOOK_NORMS`.
        kmeans_init: fit the codebook with k-means on the first training batch.
        code_vector_size: size of the affine scale and bias (default `feature_size`).

    Attributes:
        cdist_chunk_size: vectors per search chunk (kept for vqtorch code that sets it; the
            search bounds its memory itself).
        enabled: False turns the layer into the identity (after `norm`), with an empty `misc`.
    """

    cdist_chunk_size = 1024
    enabled = True

    codebook: nn.Embedding  # set by the subclasses
    data_initialized: Tensor  # with kmeans_init

    def __init__(
        self,
        feature_size: int,
        num_codes: int,
        dim: int = 1,
        norm: str | None = "none",
        cb_norm: str | None = "none",
        kmeans_init: bool = False,
        code_vector_size: int | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        _check_size(owner, "feature_size", feature_size)
        _check_size(owner, "num_codes", num_codes)
        if cb_norm not in CODEBOOK_NORMS:
            raise ValueError(
                f"{owner}: unknown cb_norm {cb_norm!r}; expected one of {CODEBOOK_NORMS}"
            )
        self.feature_size = feature_size
        self.code_vector_size = feature_size if code_vector_size is None else code_vector_size
        self.num_codes = num_codes
        self.dim = dim
        self.groups = 1
        self.topk = 1
        self.norm = norm
        self.codebook_norm = cb_norm
        self.norm_layer, self.norm_before_grouping = get_norm(norm, feature_size)
        if kmeans_init:
            self.register_buffer("data_initialized", torch.zeros(1))
            self.register_forward_hook(data_dependent_init_forward_hook)

    def quantize(self, codebook: Tensor, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Quantize `z` (`[B, ..., F]`) with `codebook` (`[K, F]`): `(z_q, d, q)`."""
        raise NotImplementedError

    def compute_loss(self, z_e: Tensor, z_q: Tensor) -> Tensor:
        """The commitment loss between `z_e` and `z_q`."""
        raise NotImplementedError

    def to_canonical_group_format(self, z: Tensor, groups: int) -> Tensor:
        """`[B, F (at dim), ...]` -> `[B, ..., groups, F // groups]`."""
        return z.moveaxis(self.dim, -1).contiguous().unflatten(-1, (groups, -1))

    def to_original_format(self, x: Tensor) -> Tensor:
        """`[B, ..., groups, F // groups]` -> `[B, F (at dim), ...]`."""
        return x.flatten(-2, -1).moveaxis(-1, self.dim)

    def prepare_inputs(self, z: Tensor, groups: int) -> Tensor:
        """Normalise `z` and bring it to `[B, ..., groups, F // groups]`.

        `norm_layer` acts before the split for `"bn"`, `"gn"`, `"in"` (on the input as given)
        and after it for `"l2"`, `"l2c"` (on every sub-vector).
        """
        self._check_input(z)
        if self.norm_before_grouping:
            z = self.norm_layer(z)
        z = self.to_canonical_group_format(z, groups)
        if not self.norm_before_grouping:
            z = self.norm_layer(z)
        return z

    def _check_input(self, z: Tensor) -> None:
        owner = type(self).__name__
        if not isinstance(z, Tensor):
            raise TypeError(f"{owner}: expected a tensor input, got {type(z).__name__}")
        if z.dim() == 0:
            raise ValueError(f"{owner}: expected a tensor of at least 1 dimension, got a scalar")
        if not -z.dim() <= self.dim < z.dim():
            raise IndexError(
                f"{owner}: dim={self.dim} is out of range for an input of shape "
                f"{tuple(z.shape)}; expected a value in [{-z.dim()}, {z.dim() - 1}]"
            )
        if z.shape[self.dim] != self.feature_size:
            hint = " (did you mean dim=-1?)" if z.shape[-1] == self.feature_size else ""
            raise ValueError(
                f"{owner}: the input has {z.shape[self.dim]} features on dim={self.dim} (shape "
                f"{tuple(z.shape)}), but feature_size is {self.feature_size}{hint}"
            )

    @property
    def requires_grad(self) -> bool:
        """Whether the codebook takes gradients."""
        return self.codebook.weight.requires_grad

    def set_requires_grad(self, requires_grad: bool) -> None:
        """Let the codebook take gradients, or freeze it."""
        self.codebook.weight.requires_grad_(requires_grad)

    def extra_repr(self) -> str:
        return "\n".join(
            [f"num_codes: {self.num_codes}", f"groups: {self.groups}", f"enabled: {self.enabled}"]
        )
