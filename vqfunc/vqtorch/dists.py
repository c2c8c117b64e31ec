"""`vqtorch.dists`: distances between vectors and codes, and the nearest-code search.

`euclidean_cdist_topk` and `cosine_cdist_topk` take `[B, N, F]` vectors and a `[K, F]` codebook
and return `{"d": distances [B, N, topk], "q": codes [B, N, topk]}`; with `topk=1` (what the
layers use) the search is vqfunc's exact, memory-bounded nearest-code search. The losses
`euclidean_distance` and `cosine_distance` return the mean squared error per batch element.

Where vqtorch's versions fail, these work: `cosine_cdist_topk` (vqtorch's raises `NameError`)
returns the same dictionary as `euclidean_cdist_topk`, with `d = 1 - cos` (half the squared
distance between the unit vectors); `half_precision=True` ranks in float32 on the CPU (vqtorch
calls `cdist` in half precision, which CPUs do not offer for mixed dtypes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from vqfunc._search import nearest_codes

__all__ = [
    "check_shape",
    "cosine_cdist_topk",
    "cosine_distance",
    "euclidean_cdist_topk",
    "euclidean_distance",
    "get_dist_fns",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
DistFn = Callable[..., dict[str, Tensor]]


def check_shape(tensor: Tensor, codebook: Tensor) -> None:
    """`tensor` is `[B, N, F]` and `codebook` `[K, F]` with the same `F`."""
    if tensor.dim() != 3:
        raise RuntimeError(
            f"expected a 3d tensor [batch, vectors, features], got shape {tuple(tensor.shape)}"
        )
    if codebook.dim() != 2 or tensor.size(2) != codebook.size(1):
        raise RuntimeError(
            "expected the tensor and the codebook to have the same feature size, got "
            f"{tuple(tensor.shape)} and {tuple(codebook.shape)}"
        )


def get_dist_fns(dist: str) -> tuple[LossFn, DistFn]:
    """`(loss_fn, dist_fn)` for `dist`: `"euc"` / `"euclidean"` or `"cos"` / `"cosine"`."""
    if dist in ("euc", "euclidean"):
        return euclidean_distance, euclidean_cdist_topk
    if dist in ("cos", "cosine"):
        return cosine_distance, cosine_cdist_topk
    raise ValueError(
        f"unknown distance method: {dist!r}; expected 'euc', 'euclidean', 'cos' or 'cosine'"
    )


def euclidean_distance(z: Tensor, z_q: Tensor) -> Tensor:
    """Mean squared difference of `z` and `z_q` per batch element (axis 0): `[B]`.

    No square root is taken: it is the mean squared error, as vqtorch's layers use it.
    """
    if z.shape != z_q.shape:
        raise RuntimeError(
            f"expected z and z_q to have the same shape, got {tuple(z.shape)} and "
            f"{tuple(z_q.shape)}"
        )
    return (z_q - z).flatten(1).square().mean(1)


def cosine_distance(z: Tensor, z_q: Tensor) -> Tensor:
    """`euclidean_distance` between `z` and `z_q` scaled to unit length along the last axis."""
    return euclidean_distance(F.normalize(z, p=2, dim=-1), F.normalize(z_q, p=2, dim=-1))


def euclidean_cdist_topk(
    tensor: Tensor,
    codebook: Tensor,
    compute_chunk_size: int = 1024,
    topk: int = 1,
    half_precision: bool = False,
) -> dict[str, Tensor]:
    """The `topk` nearest codes of every vector and their Euclidean distances.

    Args:
        tensor: `[B, N, F]` vectors.
        codebook: `[K, F]` codes.
        compute_chunk_size: vectors per chunk of the `topk > 1` search (the `topk=1` search
            bounds its memory itself).
        topk: how many nearest codes to return; -1 for all of them, nearest first.
        half_precision: on CUDA, compute the `topk > 1` distances in float16 (the `topk=1`
            search reads half inputs in their own precision there); ignored on CPU.

    Returns:
        `{"d": [B, N, topk] distances in tensor's dtype, "q": [B, N, topk] int64 codes}`.
    """
    check_shape(tensor, codebook)
    b, n, c = tensor.shape
    if topk == -1:
        topk = codebook.size(0)
    flat = tensor.detach().reshape(-1, c)
    book = codebook.detach()
    if half_precision and flat.is_cuda:
        flat, book = flat.half(), book.half()
    if topk == 1:
        codes, distances = nearest_codes(flat, book)
        d, q = distances.unsqueeze(-1), codes.unsqueeze(-1)
    else:
        dtype = torch.promote_types(torch.promote_types(flat.dtype, book.dtype), torch.float32)
        if half_precision and flat.is_cuda:
            dtype = torch.float16
        parts = [
            torch.cdist(chunk.to(dtype), book.to(dtype)).topk(topk, dim=-1, largest=False)
            for chunk in flat.split(max(int(compute_chunk_size), 1))
        ]
        if parts:
            d = torch.cat([p.values for p in parts])
            q = torch.cat([p.indices for p in parts])
        else:
            d = flat.new_zeros(0, topk)
            q = torch.zeros(0, topk, dtype=torch.long, device=flat.device)
    return {"d": d.to(tensor.dtype).reshape(b, n, -1), "q": q.long().reshape(b, n, -1)}


def cosine_cdist_topk(
    tensor: Tensor,
    codebook: Tensor,
    chunks: int = 4,
    topk: int = 1,
    half_precision: bool = False,
) -> dict[str, Tensor]:
    """The `topk` codes of highest cosine similarity: `euclidean_cdist_topk` on unit vectors.

    Returns the same dictionary as `euclidean_cdist_topk`, with `d = 1 - cos(z, c)` (half the
    squared distance between the unit vectors). `chunks` is the chunk size of the search, as
    `compute_chunk_size` there.
    """
    check_shape(tensor, codebook)
    out = euclidean_cdist_topk(
        F.normalize(tensor, p=2, dim=-1),
        F.normalize(codebook, p=2, dim=-1),
        chunks,
        topk,
        half_precision,
    )
    return {"d": 0.5 * out["d"].square(), "q": out["q"]}
