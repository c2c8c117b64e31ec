"""`vqtorch.nn.rvq`: `ResidualVectorQuant`, vqtorch's residual vector quantizer.

`groups` is the number of residual levels: level `i` quantizes what levels `1 .. i-1` left of
each vector, and the output is the sum of the levels' codes (`vqfunc.residual.quantize`). With
`share=True` every level searches one codebook of `num_codes` rows; with `share=False` level
`i` searches its own block of `num_codes // groups` rows (`group_size`), and its codes in
`misc["q"]` are rows of the whole codebook (level `i`'s start at `i * group_size`). `misc` holds
`"z"` and `"z_q"` `[*B, 1, F]`, `"d"` and `"q"` `[*B, groups]` (the distance `||r_i||` left after
each level), `"z_res"` `[*B, groups + 1, F]` (the residuals `r_0 = z, ..., r_L = z - z_q`),
`"loss"` (between the input and the sum of the levels) and `"perplexity"`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from vqfunc._estimators import estimate
from vqfunc._losses import commitment_loss
from vqfunc._quantize import code_vectors
from vqfunc.nn._no_vq import switched_off
from vqfunc.residual._config import ResidualConfig
from vqfunc.residual._quantize import ResidualOutput, quantize
from vqfunc.vqtorch.nn.vq import InplaceOptimizer, VectorQuant, _empty_affine
from vqfunc.vqtorch.norms import with_codebook_normalization

__all__ = ["ResidualVectorQuant"]


class ResidualVectorQuant(VectorQuant):
    """vqtorch's residual vector quantizer (see the module docstring).

    The other arguments (`beta`, `sync_nu`, `affine_lr`, `affine_groups`, `replace_freq`,
    `inplace_optimizer`, `dim`, `norm`, `cb_norm`, `kmeans_init`) are `VectorQuant`'s, as
    keywords. Codebook normalisation is best left off: residual quantization depends on the
    codes' norms.

    Args:
        feature_size: size of the quantized axis `dim` (every code has `feature_size` entries).
        num_codes: codebook rows (with `share=False`, of all levels together).
        groups: number of residual levels (1: the same as `VectorQuant`).
        share: whether the levels share one codebook.
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
            raise ValueError(
                f"{owner}: groups (the number of residual levels) must be a positive int, "
                f"got {groups!r}"
            )
        num_codebooks = 1 if share else groups
        if isinstance(num_codes, int) and num_codes < num_codebooks:
            raise ValueError(
                f"{owner}: with share=False, num_codes={num_codes} counts the codes of all "
                f"levels and must be at least groups={groups}"
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
            code_vector_size=feature_size,
        )
        self.groups = groups
        self.share = share
        self.group_size = num_codes // num_codebooks
        # vqtorch's plain codebook was drawn above; the residual one replaces it (same draws).
        self.codebook = nn.Embedding(self.group_size * num_codebooks, feature_size)
        self._attach_inplace_optimizer(inplace_optimizer)

    def get_codebook_by_group(self, group: int) -> tuple[Tensor, int]:
        """The rows level `group` searches, and the global index of the first of them."""
        offset = 0 if self.share else group * self.group_size
        return self.codebook.weight[offset : offset + self.group_size], offset

    @with_codebook_normalization
    def forward(self, z: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """Quantize `z` level after level: `(z_q, misc)` (see the module docstring)."""
        z = self.prepare_inputs(z, groups=1)
        if not self.enabled or switched_off(id(self)):
            return self.to_original_format(z), {}
        rows = z[..., 0, :]
        z_q, out = self._quantize_levels(rows)
        codes = out.codes
        if not self.share:
            codes = codes + torch.arange(self.groups, device=codes.device) * self.group_size
        default = torch.get_default_dtype()
        misc = {
            "z": z,
            "z_q": out.codewords.unsqueeze(-2),
            "d": out.distances.to(default),
            "q": codes,
            "z_res": out.residuals.to(default),
            "loss": out.loss,
            "perplexity": self._perplexity(out.histogram),
        }
        return self.to_original_format(z_q.unsqueeze(-2)), misc

    def _residual_books(self) -> tuple[Tensor, ResidualConfig]:
        """The levels' effective codebooks and the core configuration for them."""
        weight = self.codebook.weight
        if self.training:
            weight = weight.clone()  # the forward hooks may rewrite the codebook afterwards
        levels, k = self.groups, self.group_size
        affine = getattr(self, "affine_transform", None)
        if affine is not None and bool(getattr(affine, "use_running_statistics", False)):
            raise NotImplementedError(
                f"{type(self).__name__}: an affine_transform with running statistics needs each "
                "level's residual before that level is searched, which the residual core does "
                "not expose; use the learned affine map (affine_lr > 0)"
            )
        if self.share:
            books = weight if affine is None else affine(weight)
        elif affine is None:
            books = weight[: levels * k].view(levels, k, -1)
        else:
            books = torch.stack([affine(weight[i * k : (i + 1) * k]) for i in range(levels)])
        cfg = ResidualConfig(
            feature_size=self.feature_size,
            num_codes=k if self.share else k * levels,
            levels=levels,
            share=self.share,
            dim=-1,
            beta=float(self.beta),
            sync_nu=max(float(self.nu), 0.0),
        )
        return books, cfg

    def _quantize_levels(self, rows: Tensor) -> tuple[Tensor, ResidualOutput]:
        """`vqfunc.residual.quantize` on rows `[*B, F]`, with the in-place step in training."""
        if not (self.training and hasattr(self, "inplace_codebook_optimizer")):
            books, cfg = self._residual_books()
            return quantize(_empty_affine(books, cfg), rows, cfg)
        with torch.no_grad():
            books, cfg = self._residual_books()
            _, searched = quantize(_empty_affine(books, cfg), rows, cfg)
        code_rows = searched.codes.reshape(-1, cfg.levels)
        residuals = searched.residuals[..., : cfg.levels, :].reshape(
            -1, cfg.levels, cfg.feature_size
        )

        def loss() -> Tensor:
            books, _ = self._residual_books()
            vectors = code_vectors(_empty_affine(books, cfg), code_rows, cfg, residuals.dtype)
            return commitment_loss(residuals, vectors, 1.0)

        self._inplace_step(loss)
        books, cfg = self._residual_books()
        dtype = searched.z.dtype
        vectors = code_vectors(_empty_affine(books, cfg), code_rows, cfg, dtype)  # [M, L, F]
        flat = rows.to(dtype).reshape(-1, cfg.feature_size)
        codewords = vectors.sum(1)
        batch = searched.codes.shape[:-1]
        levels = torch.cat([flat.unsqueeze(1), flat.unsqueeze(1) - vectors.cumsum(1)], 1)
        out = searched._replace(
            loss=commitment_loss(flat, codewords, cfg.beta),
            codewords=codewords.reshape(*batch, cfg.feature_size),
            residuals=levels.reshape(*batch, cfg.levels + 1, cfg.feature_size),
        )
        return estimate(flat, codewords, cfg).reshape(rows.shape).to(rows.dtype), out
