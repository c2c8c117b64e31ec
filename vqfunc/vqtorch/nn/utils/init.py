"""`vqtorch.nn.utils.init`: the k-means warm-up of `kmeans_init=True`, as vqtorch times it.

`data_dependent_init_forward_hook` is a forward hook: after the first forward pass in training
mode (also under `torch.no_grad()`), it fits the codebook to the vectors that pass saw (the
`misc` it returned) and sets the buffer `data_initialized`, so the new codes take effect from
the next batch. What it fits:

- `VectorQuant`: all rows to the input vectors `misc["z"]`;
- `GroupVectorQuant`: shared, the sub-vectors of all groups pooled; separate, each group's
  block of `num_codes // groups` rows to that group's sub-vectors;
- `ResidualVectorQuant`: shared, the residuals `misc["z_res"]` of all levels pooled (as the
  first pass computed them); separate, level `i`'s block to the residual it searched.

With more vectors than codes the codes are vqfunc's k-means (k-means|| seeding and Lloyd
iterations, plain torch on CPU or GPU, where vqtorch needs CUDA and torchpq); with fewer, the
vectors are repeated until every code has one, plus noise of standard deviation 1e-3 (with a
warning). Unlike vqtorch, the codebook keeps its size when the number of codes is not a
multiple of the number of vectors, subclasses of the layers are warmed like their base, and a
disabled layer (`enabled=False`) is left alone.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from vqfunc._kmeans import kmeans

__all__ = ["data_dependent_init_forward_hook"]

# Lloyd iterations of the warm-up (as `vqfunc.warmup_params(method="kmeans")`).
KMEANS_ITERS = 20


def _kmeans_centroids(data: Tensor, num_codes: int) -> Tensor:
    """`num_codes` k-means centroids of the rows of `data` `[N, d]` (`N > num_codes`)."""
    return kmeans(data.float(), num_codes, iters=KMEANS_ITERS)


def _sample_centroids(z_e: Tensor, num_codes: int, use_kmeans: bool) -> Tensor:
    """`num_codes` codes for the vectors `z_e` `[..., d]`."""
    data = z_e.detach().reshape(-1, z_e.shape[-1])
    n = data.shape[0]
    if n == 0:
        raise ValueError("kmeans_init: the first training batch holds no vectors")
    if num_codes >= n:
        warnings.warn(
            f"kmeans_init: the codebook has more codes than the warm-up batch has vectors "
            f"({num_codes} vs {n}); the vectors are repeated, with noise. Use a smaller "
            "codebook or a larger first batch.",
            stacklevel=3,
        )
        repeats = -(-num_codes // n)
        codes = data.tile(repeats, 1)[:num_codes].clone()
        return codes + 1e-3 * torch.randn_like(codes)
    if use_kmeans:
        return _kmeans_centroids(data, num_codes)
    return data[torch.randperm(n, device=data.device)[:num_codes]].clone()


@torch.no_grad()
def data_dependent_init_forward_hook(
    self: Any,
    inputs: tuple[Any, ...],
    outputs: tuple[Tensor, dict[str, Any]],
    use_kmeans: bool = True,
    verbose: bool = False,
) -> None:
    """Forward hook of `kmeans_init=True`: fit the codebook to the batch just quantized, once.

    Args:
        self: the VQ layer (`VectorQuant` or a subclass).
        inputs: the forward pass's arguments (unused).
        outputs: its `(z_q, misc)`.
        use_kmeans: k-means centroids (default); False draws distinct vectors at random.
        verbose: print a line when it runs.
    """
    from vqfunc.vqtorch.nn.gvq import GroupVectorQuant
    from vqfunc.vqtorch.nn.rvq import ResidualVectorQuant

    if not self.training or bool(self.data_initialized.item() == 1):
        return
    _, misc = outputs
    if not misc:  # a disabled layer returns an empty misc
        return
    if verbose:
        print("initializing codebook with k-means++")
    weight = self.codebook.weight
    if isinstance(self, (GroupVectorQuant, ResidualVectorQuant)):
        z_e = misc["z_res"] if isinstance(self, ResidualVectorQuant) else misc["z"]
        k = self.group_size
        if self.share:
            weight.data[:k] = _sample_centroids(z_e, k, use_kmeans).to(weight.dtype)
        else:
            for i in range(self.groups):
                block = slice(i * k, (i + 1) * k)
                fitted = _sample_centroids(z_e[..., i, :], k, use_kmeans)
                weight.data[block] = fitted.to(weight.dtype)
    else:
        rows = weight.shape[0]
        weight.data.copy_(_sample_centroids(misc["z"], rows, use_kmeans).to(weight.dtype))
    self.data_initialized.fill_(1)
