"""`vqtorch.nn.vq`: `VectorQuant`, vqtorch's vector-quantization layer.

An adapter over vqfunc's functional core: `forward` brings the input to vqtorch's canonical
layout (`prepare_inputs`: `dim` last, `[..., groups, feature_size // groups]`, normalised),
builds the effective codebook with the layer's own `affine_transform` module, and calls
`vqfunc.quantize` on it (Euclidean search, straight-through estimator with the synchronized
update, commitment loss); it then lays the results out as vqtorch does. The stateful parts
run where vqtorch runs them: the in-place codebook step inside `forward`, the k-means warm-up
and dead-code replacement in forward hooks after it (`vqfunc.vqtorch.nn.utils`).

`misc` holds vqtorch's keys, shapes and dtypes: `"z"` and `"z_q"` `[*B, groups, d]` (the
normalised input and its codes before the estimator, `d = feature_size // groups`), `"d"` and
`"q"` `[*B, groups]` (distances and int64 codes; for `share=False` indices into the whole
codebook, group `g`'s rows starting at `g * num_codes // groups`), `"loss"` and
`"perplexity"`; `B` is the input's shape without `dim`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vqfunc._alternating import codebook_loss
from vqfunc._config import VQConfig
from vqfunc._estimators import estimate, straight_through, synchronized
from vqfunc._losses import commitment_loss
from vqfunc._metrics import perplexity
from vqfunc._params import VQParams
from vqfunc._quantize import QuantizeOutput, dequantize, quantize
from vqfunc.nn._no_vq import switched_off
from vqfunc.vqtorch.dists import cosine_cdist_topk, get_dist_fns
from vqfunc.vqtorch.nn.affine import AffineTransform
from vqfunc.vqtorch.nn.utils.replace import lru_replacement
from vqfunc.vqtorch.nn.vq_base import _VQBaseLayer
from vqfunc.vqtorch.norms import with_codebook_normalization

__all__ = ["VectorQuant"]

InplaceOptimizer = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


@functools.lru_cache(maxsize=256)
def _config(
    feature_size: int, num_codes: int, groups: int, share: bool, beta: float, nu: float, dist: str
) -> VQConfig:
    """The core's configuration of one call: features last, affine already applied."""
    return VQConfig(
        feature_size=feature_size,
        num_codes=num_codes,
        dim=-1,
        groups=groups,
        share=share,
        beta=beta,
        sync_nu=nu,
        dist=dist,  # type: ignore[arg-type]
    )


def _empty_affine(books: Tensor, cfg: Any) -> VQParams:
    """Core params of effective codebooks `books` (the affine map is already in them)."""
    zeros = books.new_zeros(cfg.layout.affine_shape)
    return VQParams(books, zeros, zeros)


class VectorQuant(_VQBaseLayer):
    """vqtorch's vector-quantization layer, with the straight-through estimator.

    `z_q, misc = layer(z_e)`: `z_q` has `z_e`'s shape and dtype. See the module docstring for
    `misc`.

    Args:
        feature_size: size of the quantized axis `dim`.
        num_codes: number of codes.
        beta: commitment trade-off in [0, 1]: the loss is
            `(1 - beta) * mse(z, sg(z_q)) + beta * mse(sg(z), z_q)`.
        sync_nu: weight of the synchronized update (0: off).
        affine_lr: learning-rate scale of the affine re-parameterisation (0: off); with it
            the layer has `affine_transform`, an `AffineTransform` of `code_vector_size`.
        affine_groups: consecutive blocks of codes with their own affine scale and bias.
        replace_freq: replace codes unused for this many training steps (0: off), with
            `lru_replacement(layer, rho=0.01, timeout=replace_freq)`.
        inplace_optimizer: a callable that takes the codebook's parameters and returns an
            optimizer, e.g. `lambda *args, **kwargs: torch.optim.SGD(*args, **kwargs, lr=50.0,
            momentum=0.9)`; needs `beta=1.0`. Every training forward pass then searches the
            codes, takes one step of that optimizer on `mse(sg(z), C[q])`, and returns the
            updated codes of the same assignments.
        dim: the feature axis (see `_VQBaseLayer`).
        norm: input normalisation (see `_VQBaseLayer`).
        cb_norm: codebook normalisation (see `_VQBaseLayer`).
        kmeans_init: k-means warm-up on the first training batch (see `_VQBaseLayer`).
        code_vector_size: size of the affine scale and bias (see `_VQBaseLayer`).
    """

    # vqtorch's plain layer reports distances in the input's dtype, the others in the default.
    _distances_in_input_dtype = True

    def __init__(
        self,
        feature_size: int,
        num_codes: int,
        beta: float = 0.95,
        sync_nu: float = 0.0,
        affine_lr: float = 0.0,
        affine_groups: int = 1,
        replace_freq: int = 0,
        inplace_optimizer: InplaceOptimizer | None = None,
        *,
        dim: int = 1,
        norm: str | None = "none",
        cb_norm: str | None = "none",
        kmeans_init: bool = False,
        code_vector_size: int | None = None,
    ) -> None:
        super().__init__(
            feature_size,
            num_codes,
            dim=dim,
            norm=norm,
            cb_norm=cb_norm,
            kmeans_init=kmeans_init,
            code_vector_size=code_vector_size,
        )
        self.loss_fn, self.dist_fn = get_dist_fns("euclidean")
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0.0 <= beta <= 1.0:
            raise ValueError(f"{type(self).__name__}: beta must be in [0, 1], got {beta!r}")
        self.beta = beta
        self.nu = sync_nu
        self.affine_lr = affine_lr
        self.codebook = nn.Embedding(self.num_codes, self.feature_size)
        self._attach_inplace_optimizer(inplace_optimizer)
        if affine_lr > 0:
            self.affine_transform = AffineTransform(
                self.code_vector_size,
                use_running_statistics=False,
                lr_scale=affine_lr,
                num_groups=affine_groups,
            )
        if replace_freq > 0:
            lru_replacement(self, rho=0.01, timeout=replace_freq)

    def _attach_inplace_optimizer(self, inplace_optimizer: InplaceOptimizer | None) -> None:
        """Build the in-place optimizer over the (final) codebook."""
        if inplace_optimizer is None:
            return
        if self.beta != 1.0:
            raise ValueError(
                f"{type(self).__name__}: inplace_optimizer can only be used with beta=1.0, "
                f"got beta={self.beta!r}"
            )
        if not callable(inplace_optimizer):
            raise TypeError(
                f"{type(self).__name__}: inplace_optimizer must be a callable that takes the "
                "codebook's parameters and returns an optimizer, e.g. lambda *args, **kwargs: "
                "torch.optim.SGD(*args, **kwargs, lr=50.0, momentum=0.9); got "
                f"{type(inplace_optimizer).__name__}"
            )
        self.inplace_codebook_optimizer = inplace_optimizer(self.codebook.parameters())

    # --- vqtorch's building blocks, as methods ------------------------------------------------

    def straight_through_approximation(self, z: Tensor, z_q: Tensor) -> Tensor:
        """Value `z_q`, gradient identity to `z` (plus `nu` times it to `z_q` when `nu > 0`)."""
        out = straight_through(z, z_q)
        return synchronized(out, z_q, self.nu) if self.nu > 0 else out

    def compute_loss(self, z_e: Tensor, z_q: Tensor) -> Tensor:
        """The commitment loss per batch element (`[B]`) with `self.loss_fn`."""
        return (1.0 - self.beta) * self.loss_fn(z_e, z_q.detach()) + self.beta * self.loss_fn(
            z_e.detach(), z_q
        )

    def quantize(self, codebook: Tensor, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Quantize `z` (`[B, ..., F]`) with `codebook` (`[K, F]`), as one group.

        Applies `affine_transform` (after updating its running statistics), searches with
        `self.dist_fn`, and, in training mode with an in-place optimizer, takes its step and
        looks the same codes up again in the updated codebook.

        Returns:
            `(z_q, d, q)`: `z_q` `[B, ..., F]`, distances and int64 codes `[B, ...]`.
        """
        z_flat = z.reshape(z.shape[0] if z.dim() > 1 else 1, -1, z.shape[-1])
        affine = getattr(self, "affine_transform", None)

        def effective(raw: Tensor) -> Tensor:
            return raw if affine is None else affine(raw)

        if affine is not None:
            affine.update_running_statistics(z_flat, codebook)
        with torch.no_grad():
            found = self.dist_fn(
                z_flat, effective(codebook), self.cdist_chunk_size, self.topk, z.is_cuda
            )
            d = found["d"].view(z.shape[:-1])
            q = found["q"].view(z.shape[:-1]).long()
        if self.training and hasattr(self, "inplace_codebook_optimizer"):
            self._inplace_step(
                lambda: ((F.embedding(q, effective(codebook)) - z.detach()) ** 2).mean()
            )
        return F.embedding(q, effective(codebook)), d, q

    @torch.no_grad()
    def get_codebook(self) -> Tensor:
        """The effective codes `[rows, d]` (the affine map applied as the forward pass does)."""
        weight = self.codebook.weight
        affine = getattr(self, "affine_transform", None)
        if affine is None:
            return weight
        if self._shares_codebook():
            return affine(weight)
        k = self._codes_per_group()
        return torch.cat([affine(weight[i * k : (i + 1) * k]) for i in range(self.groups)])

    def get_codebook_affine_params(self) -> tuple[Tensor, Tensor] | None:
        """`affine_transform.get_affine_params()`, or None without affine re-parameterisation."""
        affine = getattr(self, "affine_transform", None)
        return None if affine is None else affine.get_affine_params()

    # --- the forward pass ---------------------------------------------------------------------

    @with_codebook_normalization
    def forward(self, z: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """Quantize `z` (`feature_size` features on `dim`): `(z_q, misc)`."""
        z = self.prepare_inputs(z, self.groups)
        if not self.enabled or switched_off(id(self)):
            return self.to_original_format(z), {}
        z_q, out, offsets = self._quantize_parts(z)
        shape = z.shape[:-1]
        codes = out.codes.reshape(shape)
        if offsets is not None:
            codes = codes + offsets
        distances_dtype = z.dtype if self._distances_in_input_dtype else torch.get_default_dtype()
        misc = {
            "z": z,
            "z_q": out.codewords.reshape(z.shape),
            "d": out.distances.reshape(shape).to(distances_dtype),
            "q": codes,
            "loss": out.loss,
            "perplexity": self._perplexity(out.histogram),
        }
        return self.to_original_format(z_q.reshape(z.shape)), misc

    def _quantize_parts(self, z: Tensor) -> tuple[Tensor, QuantizeOutput, Tensor | None]:
        """`vqfunc.quantize` on `z` `[*B, G, d]`: `(z_q [*B, F], out, code offsets or None)`."""
        flat = z.flatten(-2)
        if not (self.training and hasattr(self, "inplace_codebook_optimizer")):
            books, cfg = self._effective_books(z, update_statistics=True)
            z_q, out = quantize(_empty_affine(books, cfg), flat, cfg)
            return z_q, out, self._code_offsets(z)
        # vqtorch's alternating step: search, step the codebook on the codes found, and look
        # the same codes up in the updated codebook.
        with torch.no_grad():
            books, cfg = self._effective_books(z, update_statistics=True)
            _, searched = quantize(_empty_affine(books, cfg), flat, cfg)

        def loss() -> Tensor:
            books, _ = self._effective_books(z, update_statistics=False)
            return codebook_loss(_empty_affine(books, cfg), searched.z, searched.codes, cfg)

        self._inplace_step(loss)
        books, cfg = self._effective_books(z, update_statistics=False)
        params = _empty_affine(books.to(searched.z.dtype), cfg)
        codewords = dequantize(params, searched.codes, cfg)
        rows = self._search_view(flat, cfg, searched.z.dtype)
        loss_value = commitment_loss(rows, codewords, cfg.beta)
        z_q = estimate(rows, codewords, cfg)
        out = searched._replace(loss=loss_value, codewords=codewords)
        return z_q.to(z.dtype), out, self._code_offsets(z)

    @staticmethod
    def _search_view(flat: Tensor, cfg: VQConfig, dtype: torch.dtype) -> Tensor:
        """The input rows `[*B, F]` as the search saw them, differentiable (unit groups for
        cosine)."""
        rows = flat.to(dtype)
        if cfg.dist == "cosine":
            rows = F.normalize(rows.unflatten(-1, (cfg.groups, cfg.code_dim)), dim=-1).flatten(-2)
        return rows

    def _inplace_step(self, loss: Callable[[], Tensor]) -> None:
        """One step of the in-place optimizer on `loss()`, with respect to the codebook only.

        The codebook's accumulated gradient (the task's) is set aside and restored, and no
        other parameter receives a gradient.
        """
        weight = self.codebook.weight
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(loss(), [weight])
        saved = weight.grad
        weight.grad = grad
        try:
            self.inplace_codebook_optimizer.step()
        finally:
            weight.grad = saved

    # --- codebook layout ----------------------------------------------------------------------

    def _shares_codebook(self) -> bool:
        return bool(getattr(self, "share", True))

    def _codes_per_group(self) -> int:
        group_size: Any = getattr(self, "group_size", None)
        if group_size is not None:
            return int(group_size)
        return int(self.codebook.weight.shape[0])

    def _code_offsets(self, z: Tensor) -> Tensor | None:
        """Global row offsets of the groups' codes (`share=False`), else None."""
        if self._shares_codebook():
            return None
        return torch.arange(self.groups, device=z.device) * self._codes_per_group()

    def _perplexity(self, histogram: Tensor) -> Tensor:
        """Perplexity of the distribution of the batch's codes over all codebook rows."""
        counts = histogram.sum(0) if self._shares_codebook() else histogram.reshape(-1)
        return perplexity(counts)

    def _dist(self) -> str:
        return "cosine" if self.dist_fn is cosine_cdist_topk else "euclidean"

    def _effective_books(self, z: Tensor, *, update_statistics: bool) -> tuple[Tensor, VQConfig]:
        """The codebooks the search sees and the core configuration for them.

        `([K, d], shared)` or `([G, K, d], separate)`: the raw rows mapped by `affine_transform`
        per group, as vqtorch maps each group's slice. An affine map in running-statistics
        mode first folds each group's vectors into its statistics, so the groups see
        different maps and always get a codebook each.
        """
        weight = self.codebook.weight
        if self.training:
            # The forward hooks rewrite the codebook after this pass; its graph keeps the
            # values it was computed with.
            weight = weight.clone()
        groups, k = self.groups, self._codes_per_group()
        share = self._shares_codebook()
        affine = getattr(self, "affine_transform", None)
        running = affine is not None and bool(getattr(affine, "use_running_statistics", False))
        if affine is None:
            books = weight if share else weight[: groups * k].view(groups, k, -1)
        elif share and not running:
            books = affine(weight)
        else:
            parts = []
            for i in range(groups):
                rows = weight if share else weight[i * k : (i + 1) * k]
                if update_statistics:
                    vectors = z[..., i : i + 1, :].reshape(1, -1, z.shape[-1])
                    affine.update_running_statistics(vectors, rows)
                parts.append(affine(rows))
            books = torch.stack(parts)
        core_share = books.dim() == 2
        cfg = _config(
            self.feature_size,
            k if core_share else k * groups,
            groups,
            core_share,
            float(self.beta),
            max(float(self.nu), 0.0),
            self._dist(),
        )
        return books, cfg
