"""Residual levels with low-dimensional codebooks: learned projections around each lookup.

With `cfg.codebook_dim = d`, level `i` works in `d` dimensions between two learned maps of its
own (`ResidualParams.proj_in[i]` `[F, d]`, `proj_out[i]` `[d, F]`, each with a bias):

    e_i = r_{i-1} @ W_in_i + b_in_i                       (search vector, [M, d])
    c_i = C_i[argmin_k dist(e_i, C_i[k])]                 (cosine: between unit vectors)
    q_i = (e_i + sg(c_i - e_i)) @ W_out_i + b_out_i       (straight-through, [M, F])
    r_i = r_{i-1} - q_i

This is the factorised lookup of DAC (Kumar et al., 2023). The gradient reaches the input and
both projections through the straight-through terms, and the codes through the loss, the sum
over levels of `commitment_loss(e_i, c_i)` (with `cfg.beta`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vqfunc._losses import commitment_loss
from vqfunc._params import ResidualParams
from vqfunc._search import nearest_codes
from vqfunc.residual._config import ResidualConfig
from vqfunc.residual._levels import level_book


def init_projections(
    cfg: ResidualConfig,
    generator: torch.Generator | None,
    device: torch.device | str | None,
    dtype: torch.dtype,
) -> dict[str, Tensor]:
    """Fan-in scaled normal projections (`W / sqrt(fan_in)`) and zero biases, per level."""
    shapes = cfg.projection_shapes
    sample_device = generator.device if generator is not None else device
    f, d = cfg.feature_size, cfg.codebook_dim or cfg.feature_size

    def normal(shape: tuple[int, ...], fan_in: int) -> Tensor:
        w = torch.randn(shape, generator=generator, device=sample_device, dtype=dtype)
        return (w / fan_in**0.5).to(device)

    proj_in = normal(shapes["proj_in"], f)
    proj_out = normal(shapes["proj_out"], d)
    return {
        "proj_in": proj_in,
        "proj_in_bias": proj_in.new_zeros(shapes["proj_in_bias"]),
        "proj_out": proj_out,
        "proj_out_bias": proj_out.new_zeros(shapes["proj_out_bias"]),
    }


def project_in(params: ResidualParams, r: Tensor, level: int) -> Tensor:
    """`r @ W_in + b_in` of one level, in the dtype of `r`."""
    return r @ params.proj_in[level].to(r.dtype) + params.proj_in_bias[level].to(r.dtype)


def project_out(params: ResidualParams, c: Tensor, level: int) -> Tensor:
    """`c @ W_out + b_out` of one level, in the dtype of `c`."""
    return c @ params.proj_out[level].to(c.dtype) + params.proj_out_bias[level].to(c.dtype)


def search(e: Tensor, book: Tensor, cfg: ResidualConfig) -> tuple[Tensor, Tensor]:
    """Codes and distances of search vectors `e` `[M, d]` in `book` `[K, d]`."""
    if cfg.dist == "cosine":
        return nearest_codes(F.normalize(e, dim=-1), F.normalize(book, dim=-1))
    return nearest_codes(e, book)


def projected_levels(
    params: ResidualParams,
    codebook: Tensor,
    rows: Tensor,
    valid: Tensor,
    weights: Tensor,
    cfg: ResidualConfig,
    n: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Rows `[M, F]` through `n` projected levels.

    Args:
        weights: `[M, n]` weight of each row and level in the loss (0: masked or dropped).

    Returns:
        `(out [M, n, F], values [M, n, F], codes [M, n], distances [M, n], loss)`: `out` the
        levels' outputs with the straight-through gradient, `values` the decoded codes
        `c_i @ W_out + b_out` (differentiable with respect to the codes and `W_out`), and the
        loss summed over levels.
    """
    residual = rows
    invalid = ~valid
    outs, values, codes, distances = [], [], [], []
    loss = rows.new_zeros(())
    for level in range(n):
        book = level_book(codebook, level, cfg)
        e = project_in(params, residual, level)
        level_codes, _ = search(e.detach(), book, cfg)
        level_codes = level_codes.masked_fill(invalid, 0)
        c = book.index_select(0, level_codes)
        loss = loss + commitment_loss(e, c, cfg.beta, mask=weights[:, level])
        q = project_out(params, e + (c - e).detach(), level)
        residual = residual - q
        outs.append(q)
        values.append(project_out(params, c, level))
        codes.append(level_codes)
        distances.append(residual.detach().norm(dim=-1).masked_fill(invalid, torch.nan))
    stack = torch.stack
    return stack(outs, 1), stack(values, 1), stack(codes, 1), stack(distances, 1), loss


def decode(
    params: ResidualParams, codebook: Tensor, code_rows: Tensor, cfg: ResidualConfig
) -> Tensor:
    """`[M, F]` sum over levels of `c_i @ W_out_i + b_out_i` for row codes `[M, n]`."""
    total = None
    for level in range(code_rows.shape[-1]):
        c = level_book(codebook, level, cfg)[code_rows[:, level]]
        value = project_out(params, c, level)
        total = value if total is None else total + value
    assert total is not None
    return total


def search_vectors(params: ResidualParams, residuals: Tensor) -> Tensor:
    """The residuals `[*B, L, F]` each level searched, projected: `[*B, L, d]`."""
    w = params.proj_in.to(residuals.dtype)
    return torch.einsum("...lf,lfd->...ld", residuals, w) + params.proj_in_bias.to(residuals.dtype)
