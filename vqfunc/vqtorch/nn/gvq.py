"""`vqtorch.nn.gvq`: `GroupVectorQuant`, vqtorch's grouped vector quantizer.

Every `feature_size` vector is split into `groups` sub-vectors of `feature_size // groups`,
each quantized on its own. With `share=True` all groups search one codebook of `num_codes`
rows; with `share=False` the codebook's rows form `groups` consecutive blocks of
`num_codes // groups` (`group_size`), one per group, and the codes in `misc["q"]` are rows of
the whole codebook (group `g`'s start at `g * group_size`). With `affine_lr > 0` one affine
map (`affine_transform`) is shared by the groups and applied to each group's block.
"""

from __future__ import annotations

from torch import Tensor, nn

from vqfunc.vqtorch.nn.vq import InplaceOptimizer, VectorQuant

__all__ = ["GroupVectorQuant"]


class GroupVectorQuant(VectorQuant):
    """vqtorch's grouped vector quantizer (see the module docstring).

    The other arguments (`beta`, `sync_nu`, `affine_lr`, `affine_groups`, `replace_freq`,
    `inplace_optimizer`, `dim`, `norm`, `cb_norm`, `kmeans_init`) are `VectorQuant`'s, as
    keywords.

    Args:
        feature_size: size of the quantized axis `dim`; a multiple of `groups`.
        num_codes: codebook rows (with `share=False`, of all groups together).
        groups: sub-vectors per vector (1: the same as `VectorQuant`).
        share: whether the groups share one codebook.
    """

    _distances_in_input_dtype = False

    def __init__(
        self,
        feature_size: int,
        num_codes: int,
        groups: int = 1,
        share: bool = True,
        *,
        beta: float = 0.95,
        sync_nu: float = 0.0,
        affine_lr: float = 0.0,
        affine_groups: int = 1,
        replace_freq: int = 0,
        inplace_optimizer: InplaceOptimizer | None = None,
        dim: int = 1,
        norm: str | None = "none",
        cb_norm: str | None = "none",
        kmeans_init: bool = False,
    ) -> None:
        owner = type(self).__name__
        if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
            raise ValueError(f"{owner}: groups must be a positive int, got {groups!r}")
        if isinstance(feature_size, int) and feature_size % groups:
            raise ValueError(
                f"{owner}: feature_size={feature_size} must be divisible by groups={groups}"
            )
        num_codebooks = 1 if share else groups
        if isinstance(num_codes, int) and num_codes < num_codebooks:
            raise ValueError(
                f"{owner}: with share=False, num_codes={num_codes} counts the codes of all "
                f"groups and must be at least groups={groups}"
            )
        super().__init__(
            feature_size,
            num_codes,
            beta,
            sync_nu,
            affine_lr,
            affine_groups,
            replace_freq,
            None,
            dim=dim,
            norm=norm,
            cb_norm=cb_norm,
            kmeans_init=kmeans_init,
            code_vector_size=feature_size // groups,
        )
        self.groups = groups
        self.share = share
        self.group_size = num_codes // num_codebooks
        # vqtorch's plain codebook was drawn above; the grouped one replaces it (same draws).
        self.codebook = nn.Embedding(self.group_size * num_codebooks, feature_size // groups)
        self._attach_inplace_optimizer(inplace_optimizer)

    def get_codebook_by_group(self, group: int) -> tuple[Tensor, int]:
        """The rows group `group` searches, and the global index of the first of them."""
        offset = 0 if self.share else group * self.group_size
        return self.codebook.weight[offset : offset + self.group_size], offset

    def forward(self, z: Tensor) -> tuple[Tensor, dict[str, object]]:
        """Quantize `z` group by group: `(z_q, misc)` (see `VectorQuant.forward`)."""
        return super().forward(z)
