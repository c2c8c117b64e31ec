"""Property tests of `quantize` / `dequantize` against independent float64 computations.

Inputs range over rank (1..4), the feature axis `dim` (given positive or negative), groups,
shared or separate codebooks, Euclidean or cosine distance (with and without
`vector_normalize`), affine codebooks, the four floating dtypes, and empty batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import hypothesis.strategies as st
import torch
import torch.nn.functional as F
from hypothesis import given

import vqfunc
from vqfunc import VQConfig

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Case:
    cfg: VQConfig
    shape: tuple[int, ...]
    dtype: torch.dtype
    seed: int


@st.composite
def cases(draw: st.DrawFn, *, allow_empty: bool = True) -> Case:
    rank = draw(st.integers(1, 4))
    groups = draw(st.sampled_from([1, 2, 3]))
    code_dim = draw(st.integers(1, 4))
    feature_size = groups * code_dim
    share = draw(st.booleans())
    codes_per_book = draw(st.integers(1, 9))
    num_codes = codes_per_book if share else codes_per_book * groups
    dist = draw(st.sampled_from(["euclidean", "cosine"]))
    vector_normalize = dist == "cosine" and draw(st.booleans())
    axis = draw(st.integers(0, rank - 1))
    dim = axis if draw(st.booleans()) else axis - rank
    batch_sizes = draw(
        st.lists(st.integers(0 if allow_empty else 1, 4), min_size=rank - 1, max_size=rank - 1)
    )
    shape = list(batch_sizes)
    shape.insert(axis, feature_size)
    affine_lr = draw(st.sampled_from([0.0, 0.0, 1.5]))
    affine_groups = draw(st.sampled_from([k for k in (1, 2, 3) if codes_per_book % k == 0]))
    cfg = VQConfig(
        feature_size=feature_size,
        num_codes=num_codes,
        dim=dim,
        dist=dist,
        vector_normalize=vector_normalize,
        groups=groups,
        share=share,
        beta=draw(st.sampled_from([0.0, 0.25, 0.95, 1.0])),
        affine_lr=affine_lr,
        affine_groups=affine_groups,
    )
    return Case(cfg, tuple(shape), draw(st.sampled_from(DTYPES)), draw(st.integers(0, 2**16)))


def make_inputs(case: Case) -> tuple[vqfunc.VQParams, torch.Tensor]:
    g = torch.Generator().manual_seed(case.seed)
    # Params in the precision `quantize` computes in (float32, or float64 for float64 input),
    # so that `dequantize` (which works in the params' dtype) can match `out.codewords` bit for bit.
    params_dtype = torch.float64 if case.dtype == torch.float64 else torch.float32
    params = vqfunc.init_params(case.cfg, generator=g, dtype=params_dtype)
    # Non-trivial affine parameters (they start at 0), so the effective codebook differs.
    scale, bias = params.affine_scale, params.affine_bias
    params = params._replace(
        affine_scale=0.3 * torch.randn(scale.shape, generator=g, dtype=params_dtype),
        affine_bias=0.3 * torch.randn(bias.shape, generator=g, dtype=params_dtype),
    )
    x = (1.5 * torch.randn(case.shape, generator=g, dtype=torch.float64)).to(case.dtype)
    return params, x


def reference_rows(
    params: vqfunc.VQParams, x: torch.Tensor, cfg: VQConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 search-space rows `[M, G, d]` and codebooks `[G, K, d]`, built independently."""
    axis = cfg.dim % x.ndim
    rows = x.to(torch.float64).movedim(axis, -1).reshape(-1, cfg.groups, cfg.code_dim)
    books = params.codebook.to(torch.float64)
    if cfg.affine_lr > 0:
        # Code k of a book uses the scale and bias of its block k // (K / affine_groups).
        block = torch.arange(cfg.codes_per_book) // (cfg.codes_per_book // cfg.affine_groups)
        scale = 1.0 + cfg.affine_lr * params.affine_scale.to(torch.float64)[..., block, :]
        bias = cfg.affine_lr * params.affine_bias.to(torch.float64)[..., block, :]
        books = books * scale + bias
    books = books.expand(cfg.groups, *books.shape) if cfg.share else books
    if cfg.dist == "cosine":
        rows, books = F.normalize(rows, dim=-1), F.normalize(books, dim=-1)
    return rows, books


def tolerance(dtype: torch.dtype) -> float:
    """Absolute slack on squared distances for a search in `dtype` (values of order 10)."""
    return 1e-9 if dtype == torch.float64 else 1e-5


@given(cases())
def test_shape_dtype_and_nearest_codes(case: Case) -> None:
    params, x = make_inputs(case)
    cfg = case.cfg
    z_q, out = vqfunc.quantize(params, x, cfg)

    assert z_q.shape == x.shape
    assert z_q.dtype == x.dtype
    batch_shape = tuple(x.movedim(cfg.dim % x.ndim, -1).shape[:-1])
    code_shape = batch_shape if cfg.groups == 1 else (*batch_shape, cfg.groups)
    assert out.codes.shape == code_shape
    assert out.codes.dtype == torch.int64
    assert out.distances.shape == code_shape
    assert out.z.shape == out.codewords.shape == (*batch_shape, cfg.feature_size)
    assert out.loss.shape == ()

    rows, books = reference_rows(params, x, cfg)
    codes = out.codes.reshape(-1, cfg.groups)
    # [M, G, K] squared distances in float64 (brute force, no expansion tricks).
    all_sq = (rows.unsqueeze(-2) - books.unsqueeze(0)).square().sum(-1)
    chosen_sq = all_sq.gather(-1, codes.unsqueeze(-1)).squeeze(-1)
    best_sq = all_sq.min(-1).values if all_sq.shape[0] else chosen_sq
    slack = tolerance(x.dtype) * (1.0 + rows.square().sum(-1) + books.square().sum(-1).amax(-1))
    assert torch.all(codes >= 0) and torch.all(codes < cfg.codes_per_book)
    assert torch.all(chosen_sq <= best_sq + slack), "a code is not the nearest one"
    # Reported distances are the distances to the chosen codes.
    got = out.distances.reshape(-1, cfg.groups).to(torch.float64)
    torch.testing.assert_close(got, chosen_sq.sqrt(), atol=2e-3, rtol=1e-3)


@given(cases())
def test_dequantize_round_trips(case: Case) -> None:
    params, x = make_inputs(case)
    cfg = case.cfg
    z_q, out = vqfunc.quantize(params, x, cfg)
    decoded = vqfunc.dequantize(params, out.codes, cfg)

    assert decoded.shape == x.shape
    # Exactly the selected codes of `quantize` (out.codewords has the feature axis last).
    assert torch.equal(
        decoded.movedim(cfg.dim % x.ndim, -1).to(out.codewords.dtype), out.codewords.detach()
    )
    # And, up to the input dtype's rounding, the forward value of z_q; with vector_normalize
    # the unit codes are rescaled to the norms of the input's sub-vectors.
    axis = cfg.dim % x.ndim
    expected = decoded.to(torch.float64)
    if cfg.vector_normalize:
        norms = x.to(torch.float64).movedim(axis, -1).unflatten(-1, (cfg.groups, -1)).norm(dim=-1)
        unit = expected.movedim(axis, -1).unflatten(-1, (cfg.groups, -1))
        expected = (unit * norms.unsqueeze(-1)).flatten(-2).movedim(-1, axis)
    eps = torch.finfo(x.dtype).eps
    scale = 1.0 + float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(
        z_q.detach().to(torch.float64), expected, atol=4 * eps * scale, rtol=4 * eps
    )


@given(cases())
def test_loss_matches_formula_in_float64(case: Case) -> None:
    params, x = make_inputs(case)
    cfg = case.cfg
    _, out = vqfunc.quantize(params, x, cfg)
    rows, books = reference_rows(params, x, cfg)
    codes = out.codes.reshape(-1, cfg.groups)
    selected = books[torch.arange(cfg.groups), codes]  # [M, G, d]
    # Both terms of the commitment loss have the value mse(z, z_q); beta only splits gradients.
    diff = (rows - selected).square()
    expected = diff.sum() / max(diff.numel(), 1)
    assert out.loss.dtype == out.z.dtype
    torch.testing.assert_close(out.loss.to(torch.float64), expected, rtol=1e-4, atol=1e-5)


@given(cases())
def test_histogram_perplexity_usage_match_counts(case: Case) -> None:
    params, x = make_inputs(case)
    cfg = case.cfg
    _, out = vqfunc.quantize(params, x, cfg)
    k = cfg.codes_per_book
    codes = out.codes.reshape(-1, cfg.groups)
    if cfg.share:
        per_book = [codes.reshape(-1).tolist()]
    else:
        per_book = [codes[:, g].tolist() for g in range(cfg.groups)]
    counts = torch.tensor(
        [[float(book.count(c)) for c in range(k)] for book in per_book], dtype=torch.float64
    )
    assert out.histogram.shape == (cfg.num_books, k)
    assert torch.equal(out.histogram.to(torch.float64), counts)

    perplexities = []
    for row in counts.tolist():
        total = sum(row)
        entropy = -sum(n / total * math.log(n / total) for n in row if n > 0) if total else 0.0
        perplexities.append(math.exp(entropy))
    expected_perplexity = sum(perplexities) / len(perplexities)
    assert math.isclose(float(out.perplexity), expected_perplexity, rel_tol=1e-5)

    expected_usage = torch.tensor([sum(n > 0 for n in row) / k for row in counts.tolist()])
    torch.testing.assert_close(vqfunc.usage(out.histogram).float(), expected_usage)
    flat_codes = out.codes if cfg.share or cfg.groups == 1 else out.codes[..., 0]
    torch.testing.assert_close(vqfunc.code_histogram(flat_codes, k).to(torch.float64), counts[0])
