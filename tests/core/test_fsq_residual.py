"""`vqfunc.fsq.quantize_residual`: residual FSQ against a float64 NumPy loop written from the
definition, exact dequantization, the error bound each stage guarantees, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from support.fsq_reference import PaperFSQ, SymmetricFSQ

from vqfunc import fsq


def reference(z: np.ndarray, levels: tuple[int, ...], stages: int, symmetric: bool):
    """`(codes [N, Q], z_q [N, d], bounded [N, d])` in float64, stage by stage."""
    lv = np.asarray(levels)
    basis = np.concatenate(([1], np.cumprod(lv[:-1])))
    if symmetric:
        u = np.tanh(z)
        digits = SymmetricFSQ(levels).digits(z)
        rho = 1.0 / (lv - 1)
    else:
        ref = PaperFSQ(levels)
        u = ref.bound(z) / (lv // 2)
        digits = np.round(ref.bound(z)).astype(np.int64) + lv // 2
        rho = np.where(lv % 2 == 1, 1.0 / (lv - 1), 1.0 / np.maximum(lv - 2, 1))

    def value(d: np.ndarray) -> np.ndarray:
        return (2 * d - (lv - 1)) / (lv - 1) if symmetric else (d - lv // 2) / (lv // 2)

    codes, total = [digits @ basis], value(digits)
    remainder = u - total
    for i in range(1, stages):
        y = remainder / rho**i
        if symmetric:
            d = np.floor((lv - 1) * (y + 1) / 2 + 0.5)
        else:
            d = np.round(y * (lv // 2)) + lv // 2
        d = np.clip(d, 0, lv - 1).astype(np.int64)
        q = value(d) * rho**i
        remainder = remainder - q
        total = total + q
        codes.append(d @ basis)
    return np.stack(codes, 1), total, u


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (3, 4), (7, 6, 9)], ids=str)
def test_matches_the_reference_loop(levels: tuple[int, ...], symmetric: bool) -> None:
    rng = np.random.default_rng(len(levels))
    z = rng.normal(scale=1.5, size=(3000, len(levels)))
    cfg = fsq.ResidualFSQConfig(
        levels=levels, num_quantizers=4, dim=-1, preserve_symmetry=symmetric
    )
    z_q, out = fsq.quantize_residual(torch.from_numpy(z), cfg)
    codes, total, u = reference(z, levels, 4, symmetric)
    np.testing.assert_array_equal(out.codes.numpy(), codes)
    np.testing.assert_allclose(z_q.numpy(), total, rtol=0, atol=1e-14)
    np.testing.assert_allclose(out.bounded.numpy(), u, rtol=0, atol=1e-14)
    # Stage 0 is the plain quantizer.
    plain = fsq.FSQConfig(levels=levels, dim=-1, preserve_symmetry=symmetric)
    assert torch.equal(out.codes[:, 0], fsq.quantize(torch.from_numpy(z), plain)[1].codes)


@pytest.mark.parametrize("symmetric", [True, False])
def test_every_stage_shrinks_the_error_bound(symmetric: bool) -> None:
    levels = (8, 5, 4, 7)
    cfg = fsq.ResidualFSQConfig(
        levels=levels, num_quantizers=5, dim=-1, preserve_symmetry=symmetric
    )
    x = 2.0 * torch.randn(20000, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _, out = fsq.quantize_residual(x, cfg)
    lv = torch.tensor(levels, dtype=torch.float64)
    step = 2 / (lv - 1) if symmetric else 1 / (lv // 2)
    rho = 1 / (lv - 1) if symmetric else torch.where(lv % 2 == 1, 1 / (lv - 1), 1 / (lv - 2))
    assert torch.equal(out.residuals[:, 0], out.bounded)
    for i in range(5):
        bound = rho**i * step / 2
        worst = out.residuals[:, i + 1].abs().amax(0)
        assert torch.all(worst <= bound * (1 + 1e-9)), (i, worst, bound)
        assert torch.all(worst >= 0.9 * bound)  # and the bound is reached: it is tight


@given(
    levels=st.lists(st.integers(3, 9), min_size=1, max_size=4),
    stages=st.integers(1, 4),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_dequantize_gives_the_forward_value(
    levels: list[int], stages: int, symmetric: bool, seed: int, dtype: torch.dtype
) -> None:
    cfg = fsq.ResidualFSQConfig(
        levels=tuple(levels), num_quantizers=stages, dim=-1, preserve_symmetry=symmetric
    )
    x = torch.randn(40, len(levels), generator=torch.Generator().manual_seed(seed)).to(dtype)
    z_q, out = fsq.quantize_residual(x, cfg)
    assert z_q.dtype == dtype and out.codes.shape == (40, stages)
    assert out.codes.min() >= 0 and out.codes.max() < cfg.codebook_size
    assert torch.equal(fsq.dequantize_residual(out.codes, cfg, dtype=dtype), z_q)


def test_gradient_is_that_of_the_bound_once() -> None:
    cfg = fsq.ResidualFSQConfig(levels=(8, 5, 5), num_quantizers=3, dim=-1)
    x = torch.randn(30, 3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(fsq.quantize_residual(x, cfg)[0].sum(), [x])
    torch.testing.assert_close(grad, 1 - torch.tanh(x.detach()).square())


def test_layout_histogram_and_mask() -> None:
    cfg = fsq.ResidualFSQConfig(levels=(5, 5), num_quantizers=3)  # dim=1
    x = torch.randn(2, 2, 6, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    z_q, out = fsq.quantize_residual(x, cfg, mask=mask)
    assert z_q.shape == x.shape and out.codes.shape == (2, 6, 3)
    assert out.residuals.shape == (2, 6, 4, 2) and out.histogram.shape == (3, 25)
    assert torch.equal(out.histogram.sum(1), torch.full((3,), 9.0))
    for i in range(3):
        counts = torch.bincount(out.codes[..., i][mask], minlength=25).float()
        assert torch.equal(out.histogram[i], counts)
    assert torch.equal(fsq.dequantize_residual(out.codes, cfg), z_q)
    empty, eout = fsq.quantize_residual(torch.zeros(0, 2), cfg.replace(dim=-1))
    assert empty.shape == (0, 2) and eout.codes.shape == (0, 3)


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"level of 2.*use preserve_symmetry=True"):
        fsq.ResidualFSQConfig(levels=(2, 5), preserve_symmetry=False)
    assert fsq.ResidualFSQConfig(levels=(2, 5)).preserve_symmetry  # the symmetric grid
    with pytest.raises(ValueError, match="num_quantizers must be a positive int, got 0"):
        fsq.ResidualFSQConfig(levels=(5,), num_quantizers=0)
    cfg = fsq.ResidualFSQConfig(levels=(5, 5), num_quantizers=2, dim=-1)
    with pytest.raises(TypeError, match=r"ResidualFSQConfig .* use vqfunc.fsq.quantize\)"):
        fsq.quantize_residual(torch.zeros(3, 2), fsq.FSQConfig(levels=(5, 5)))
    with pytest.raises(ValueError, match="num_quantizers=2, codes must have a trailing axis"):
        fsq.dequantize_residual(torch.zeros(3, dtype=torch.long), cfg)
    with pytest.raises(ValueError, match="num_quantizers=1"):
        fsq.dequantize_residual(torch.zeros(3, 2, dtype=torch.long), cfg.replace(num_quantizers=1))
