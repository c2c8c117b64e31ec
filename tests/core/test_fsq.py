"""`vqfunc.fsq`: finite scalar quantization against the FSQ paper's reference code (re-written
in float64 NumPy in `support.fsq_reference`), index round trips, half precision, gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from support.fsq_reference import PaperFSQ, SymmetricFSQ

from vqfunc import fsq

LEVEL_SETS = [(8, 5, 5, 5), (3, 5, 4), (8, 6, 5), (2, 2, 3), (7, 5, 5, 5, 5), (16, 4)]


def test_the_papers_published_example() -> None:
    # Appendix A.1: FSQ(levels=[3, 5, 4]) maps [0.25, 0.6, -7] to [0, 0.5, -1], the 10th code.
    cfg = fsq.FSQConfig(levels=(3, 5, 4), dim=-1)
    z = torch.tensor([0.25, 0.6, -7.0])
    z_q, out = fsq.quantize(z, cfg)
    assert z_q.tolist() == [0.0, 0.5, -1.0]
    assert out.codes.dtype == torch.int64 and out.codes.shape == () and int(out.codes) == 10
    assert fsq.dequantize(out.codes, cfg).tolist() == [0.0, 0.5, -1.0]
    assert int(fsq.codes_from_values(z_q, cfg)) == 10


@pytest.mark.parametrize("levels", LEVEL_SETS, ids=str)
def test_float64_matches_the_reference_exactly(levels: tuple[int, ...]) -> None:
    ref = PaperFSQ(levels)
    rng = np.random.default_rng(sum(levels))
    z = rng.normal(scale=2.0, size=(4000, len(levels)))
    z_q, out = fsq.quantize(torch.from_numpy(z), fsq.FSQConfig(levels=levels, dim=-1))
    expected = ref.quantize(z)
    assert z_q.dtype == torch.float64
    np.testing.assert_array_equal(z_q.numpy(), expected)
    np.testing.assert_array_equal(out.codes.numpy(), ref.codes_to_indexes(expected))
    bounded = ref.bound(z) / (ref.levels // 2)
    np.testing.assert_allclose(out.bounded.numpy(), bounded, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("levels", LEVEL_SETS, ids=str)
def test_float32_matches_the_reference_away_from_rounding_ties(levels: tuple[int, ...]) -> None:
    ref = PaperFSQ(levels)
    rng = np.random.default_rng(1 + sum(levels))
    z = rng.normal(scale=2.0, size=(4000, len(levels))).astype(np.float32)
    z_q, out = fsq.quantize(torch.from_numpy(z), fsq.FSQConfig(levels=levels, dim=-1))
    bounded = ref.bound(z.astype(np.float64))
    # float32 and float64 may round differently within float32's error of a tie (x.5).
    clear = (np.abs(bounded - np.floor(bounded) - 0.5) > 1e-5).all(-1)
    assert clear.mean() > 0.99
    expected = ref.quantize(z.astype(np.float64))
    np.testing.assert_allclose(z_q.numpy()[clear], expected[clear], rtol=1e-7, atol=0)
    np.testing.assert_array_equal(out.codes.numpy()[clear], ref.codes_to_indexes(expected)[clear])


@pytest.mark.parametrize("levels", LEVEL_SETS, ids=str)
def test_symmetric_grid_matches_its_formula(levels: tuple[int, ...]) -> None:
    ref = SymmetricFSQ(levels)
    rng = np.random.default_rng(2 + sum(levels))
    z = rng.normal(scale=2.0, size=(4000, len(levels)))
    cfg = fsq.FSQConfig(levels=levels, dim=-1, preserve_symmetry=True)
    z_q, out = fsq.quantize(torch.from_numpy(z), cfg)
    np.testing.assert_allclose(z_q.numpy(), ref.quantize(z), rtol=0, atol=1e-15)
    np.testing.assert_array_equal(out.codes.numpy(), ref.indexes(z))
    # Symmetric about 0: -x takes the mirrored values (away from the floor's ties).
    mirrored, _ = fsq.quantize(torch.from_numpy(-z), cfg)
    np.testing.assert_allclose(mirrored.numpy(), -z_q.numpy(), atol=1e-15)
    assert set(np.unique(z_q.numpy()[:, 0]).round(12)) <= set(
        np.round(2 * np.arange(levels[0]) / (levels[0] - 1) - 1, 12)
    )


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("levels", LEVEL_SETS, ids=str)
def test_implicit_codebook_lists_every_code(levels: tuple[int, ...], symmetric: bool) -> None:
    cfg = fsq.FSQConfig(levels=levels, dim=-1, preserve_symmetry=symmetric)
    table = fsq.implicit_codebook(cfg, dtype=torch.float64)
    assert table.shape == (math.prod(levels), len(levels)) == (cfg.codebook_size, cfg.code_dim)
    codes = torch.arange(cfg.codebook_size)
    assert torch.equal(fsq.dequantize(codes, cfg, dtype=torch.float64), table)
    assert torch.equal(fsq.codes_from_values(table, cfg), codes)
    assert len({tuple(row) for row in table.tolist()}) == cfg.codebook_size  # all distinct
    if not symmetric:
        np.testing.assert_array_equal(
            table.numpy(), PaperFSQ(levels).indexes_to_codes(codes.numpy())
        )


@pytest.mark.parametrize("levels", LEVEL_SETS, ids=str)
def test_inputs_at_each_codes_centre_reach_that_code(levels: tuple[int, ...]) -> None:
    ref = PaperFSQ(levels)
    codes = np.arange(ref.codebook_size)
    digits = np.mod(np.floor_divide(codes[:, None], ref.basis), ref.levels)
    x = torch.from_numpy(ref.centre(digits))
    _, out = fsq.quantize(x, fsq.FSQConfig(levels=levels, dim=-1))
    np.testing.assert_array_equal(out.codes.numpy(), codes)
    assert float(out.usage) == 1.0


@given(
    levels=st.lists(st.integers(2, 12), min_size=1, max_size=5),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([0.3, 1.0, 3.0, 30.0]),
)
def test_index_round_trips(levels: list[int], symmetric: bool, seed: int, scale: float) -> None:
    cfg = fsq.FSQConfig(levels=levels, dim=-1, preserve_symmetry=symmetric)
    assert cfg.levels == tuple(levels)
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(64, len(levels), generator=g)
    z_q, out = fsq.quantize(x, cfg)
    assert out.codes.min() >= 0 and out.codes.max() < cfg.codebook_size
    assert torch.equal(fsq.dequantize(out.codes, cfg), z_q)
    assert torch.equal(fsq.codes_from_values(z_q, cfg), out.codes)
    codes = torch.randint(0, cfg.codebook_size, (64,), generator=g)
    assert torch.equal(fsq.codes_from_values(fsq.dequantize(codes, cfg), cfg), codes)
    # The level of feature j is digit j of the code in the mixed radix of `levels`.
    digits = [(out.codes // math.prod(levels[:j])) % level for j, level in enumerate(levels)]
    values = fsq.implicit_codebook(cfg)[out.codes]
    assert torch.equal(values, z_q)
    for j, digit in enumerate(digits):
        column = fsq.implicit_codebook(cfg)[:, j][digit * math.prod(levels[:j])]
        assert torch.equal(column, z_q[:, j])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_half_inputs_give_the_codes_of_their_float32_values(
    dtype: torch.dtype, symmetric: bool
) -> None:
    cfg = fsq.FSQConfig(levels=(8, 5, 5, 5), dim=-1, preserve_symmetry=symmetric)
    g = torch.Generator().manual_seed(0)
    x = (2.0 * torch.randn(20000, 4, generator=g)).to(dtype)
    z_q, out = fsq.quantize(x, cfg)
    z_q32, out32 = fsq.quantize(x.float(), cfg)
    assert z_q.dtype == dtype
    assert torch.equal(out.codes, out32.codes)
    assert torch.equal(z_q, z_q32.to(dtype))
    assert torch.equal(fsq.dequantize(out.codes, cfg, dtype=dtype), z_q)
    assert torch.equal(fsq.codes_from_values(z_q, cfg), out.codes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_use_every_code(dtype: torch.dtype) -> None:
    # A bound or an index computed in bfloat16 loses codes: integers above 256 and most grid
    # values are not representable. Here the inputs at every code's centre reach it.
    levels = (8, 5, 5, 5)
    ref = PaperFSQ(levels)
    codes = np.arange(ref.codebook_size)
    digits = np.mod(np.floor_divide(codes[:, None], ref.basis), ref.levels)
    x = torch.from_numpy(ref.centre(digits)).to(dtype)
    _, out = fsq.quantize(x, fsq.FSQConfig(levels=levels, dim=-1))
    assert torch.equal(out.codes, torch.from_numpy(codes))
    assert float(out.usage) == 1.0 and out.histogram.shape == (1, 1000)
    assert torch.equal(out.histogram, torch.ones(1, 1000))


@pytest.mark.parametrize("symmetric", [False, True])
def test_gradient_is_that_of_the_bound(symmetric: bool) -> None:
    levels = (8, 5, 4)
    cfg = fsq.FSQConfig(levels=levels, dim=-1, preserve_symmetry=symmetric)
    x = torch.randn(50, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (grad,) = torch.autograd.grad(fsq.quantize(x.requires_grad_(), cfg)[0].sum(), [x])
    lv = torch.tensor(levels, dtype=torch.float64)
    if symmetric:
        expected = 1 - torch.tanh(x.detach()).square()
    else:
        half_l = (lv - 1) * (1 - 1e-3) / 2
        offset = torch.where(lv % 2 == 0, 0.5, 0.0)
        shift = torch.tan(offset / half_l)
        expected = (1 - torch.tanh(x.detach() + shift).square()) * half_l / (lv // 2)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)


def test_layout_num_codebooks_and_dim() -> None:
    cfg = fsq.FSQConfig(levels=(8, 5, 5), num_codebooks=2)  # dim=1: [B, F, H, W]
    assert cfg.feature_size == 6 and cfg.codebook_size == 200
    x = torch.randn(3, 6, 4, 5, generator=torch.Generator().manual_seed(0))
    z_q, out = fsq.quantize(x, cfg)
    assert z_q.shape == x.shape and out.codes.shape == (3, 4, 5, 2)
    assert out.bounded.shape == (3, 4, 5, 6) and out.histogram.shape == (1, 200)
    assert torch.equal(fsq.dequantize(out.codes, cfg), z_q)
    # Each sub-vector is its own FSQ vector.
    single = fsq.FSQConfig(levels=(8, 5, 5), dim=-1)
    tokens = x.movedim(1, -1)
    for c in range(2):
        _, part = fsq.quantize(tokens[..., 3 * c : 3 * c + 3], single)
        assert torch.equal(part.codes, out.codes[..., c])


@pytest.mark.parametrize("shape", [(4,), (0, 4), (2, 0, 4), (0,)])
def test_any_rank_and_empty_batches(shape: tuple[int, ...]) -> None:
    if shape == (0,):
        with pytest.raises(ValueError, match=r"0 features on dim=-1 .*feature_size is 4"):
            fsq.quantize(torch.zeros(shape), fsq.FSQConfig(levels=(8, 5, 5, 5), dim=-1))
        return
    cfg = fsq.FSQConfig(levels=(8, 5, 5, 5), dim=-1)
    x = torch.randn(shape)
    z_q, out = fsq.quantize(x, cfg)
    assert z_q.shape == x.shape and out.codes.shape == shape[:-1]
    assert torch.equal(fsq.dequantize(out.codes, cfg), z_q)
    if x.numel() == 0:
        assert float(out.histogram.sum()) == 0 and float(out.perplexity) == 1.0
        assert float(out.usage) == 0.0


def test_non_finite_inputs_keep_codes_in_range() -> None:
    cfg = fsq.FSQConfig(levels=(8, 5), dim=-1)
    x = torch.tensor([[math.nan, 1.0], [math.inf, -math.inf], [-1e30, 1e30]])
    z_q, out = fsq.quantize(x, cfg)
    assert out.codes.tolist() == [0 + 8 * 4, 7 + 8 * 0, 0 + 8 * 4]
    assert torch.isnan(z_q[0, 0]) and torch.isfinite(z_q[1:]).all()  # NaN stays NaN
    assert float(out.histogram.sum()) == 3
    for sym in (False, True):
        _, res = fsq.quantize_residual(
            x, fsq.ResidualFSQConfig(levels=(8, 5), dim=-1, num_quantizers=2, preserve_symmetry=sym)
        )
        assert res.codes.min() >= 0 and res.codes.max() < 40


def test_mask_excludes_rows_from_the_statistics() -> None:
    cfg = fsq.FSQConfig(levels=(4, 4), dim=-1)
    x = torch.tensor([[-5.0, -5.0], [5.0, 5.0], [5.0, 5.0]])
    mask = torch.tensor([True, False, True])
    z_q, out = fsq.quantize(x, cfg, mask=mask)
    unmasked, _ = fsq.quantize(x, cfg)
    assert torch.equal(z_q, unmasked)
    assert out.histogram[0, 0] == 1 and out.histogram[0, 15] == 1 and out.histogram.sum() == 2
    assert float(out.usage) == 2 / 16
    _, weighted = fsq.quantize(x, cfg, mask=mask.float())
    assert torch.equal(weighted.histogram, out.histogram)
    with pytest.raises(ValueError, match=r"mask has shape \(2,\), expected \(3,\)"):
        fsq.quantize(x, cfg, mask=mask[:2])


def test_configuration_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"levels\[1\] must be an int in \[2, 1000\], got 1"):
        fsq.FSQConfig(levels=(8, 1))
    with pytest.raises(TypeError, match="levels must be a non-empty tuple"):
        fsq.FSQConfig(levels=())
    with pytest.raises(TypeError, match="levels must be a non-empty tuple"):
        fsq.FSQConfig(levels=8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_codebooks must be a positive int, got 0"):
        fsq.FSQConfig(levels=(8,), num_codebooks=0)
    with pytest.raises(TypeError, match="preserve_symmetry must be True or False"):
        fsq.FSQConfig(levels=(8,), preserve_symmetry=1)  # type: ignore[arg-type]
    cfg = fsq.FSQConfig(levels=[8, 5])  # type: ignore[arg-type]
    assert cfg.levels == (8, 5) and hash(cfg) == hash(fsq.FSQConfig(levels=(8, 5)))
    assert cfg.replace(dim=-1).dim == -1


def test_input_and_code_errors() -> None:
    cfg = fsq.FSQConfig(levels=(8, 5, 5, 5))
    with pytest.raises(ValueError, match=r"3 features on dim=1 .* cfg.feature_size is 4"):
        fsq.quantize(torch.zeros(2, 3, 4), cfg)
    with pytest.raises(ValueError, match=r"did you mean dim=-1"):
        fsq.quantize(torch.zeros(2, 3, 4), cfg)
    with pytest.raises(TypeError, match="floating tensor"):
        fsq.quantize(torch.zeros(2, 4, dtype=torch.long), cfg)
    with pytest.raises(TypeError, match=r"vqfunc.fsq.FSQConfig .* use vqfunc.fsq.quantize_resid"):
        fsq.quantize(torch.zeros(2, 4), fsq.ResidualFSQConfig(levels=(8, 5, 5, 5)))
    with pytest.raises(TypeError, match="codes must be an integer tensor"):
        fsq.dequantize(torch.zeros(3), cfg)
    with pytest.raises(ValueError, match="num_codebooks=2, codes must have a trailing axis"):
        fsq.dequantize(torch.zeros(3, 3, dtype=torch.long), cfg.replace(num_codebooks=2))
    with pytest.raises(TypeError, match=r"dtype must be a floating torch\.dtype"):
        fsq.dequantize(torch.zeros(3, dtype=torch.long), cfg, dtype=torch.long)
