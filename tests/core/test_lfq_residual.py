"""`vqfunc.lfq.quantize_residual`: residual LFQ and BSQ against a loop written from the
definition, each stage's entropy terms against plain LFQ on that stage's input, exact
dequantization, masks, and the union semantics of `sync=`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from support.union_sync import UnionSync

from vqfunc import lfq


def inputs(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("spherical", [False, True])
def test_stages_quantize_the_remainder_by_sign(spherical: bool) -> None:
    cfg = lfq.ResidualLFQConfig(bits=6, num_quantizers=4, dim=-1, spherical=spherical, scale=1.5)
    x = inputs((100, 6))
    z_q, out = lfq.quantize_residual(x, cfg)
    z = F.normalize(x, dim=-1) * 1.5 if spherical else x
    residual, total, codes = z, torch.zeros_like(z), []
    for i in range(4):
        s = torch.tensor(cfg.code_scale * 2.0**-i, dtype=torch.float64)
        q = torch.where(residual > 0, s, -s)
        codes.append(((residual > 0).long() << torch.arange(6)).sum(-1))
        torch.testing.assert_close(out.residuals[:, i], residual, rtol=0, atol=1e-15)
        residual, total = residual - q, total + q
    assert torch.equal(out.codes, torch.stack(codes, 1))
    torch.testing.assert_close(z_q, total, rtol=0, atol=1e-15)
    assert torch.equal(lfq.dequantize_residual(out.codes, cfg, dtype=torch.float64), z_q)
    # Stage 0 is plain LFQ (BSQ).
    plain = lfq.LFQConfig(bits=6, dim=-1, spherical=spherical, scale=1.5)
    assert torch.equal(out.codes[:, 0], lfq.quantize(x, plain)[1].codes)


def test_each_stage_has_the_entropy_terms_of_plain_lfq_on_its_input() -> None:
    cfg = lfq.ResidualLFQConfig(
        bits=5, num_quantizers=3, dim=-1, inv_temperature=4.0, commitment_weight=0.3
    )
    x = inputs((80, 5), seed=1).requires_grad_()
    z_q, out = lfq.quantize_residual(x, cfg)
    for i in range(3):
        stage = lfq.LFQConfig(bits=5, dim=-1, inv_temperature=4.0, scale=2.0**-i)
        _, ref = lfq.quantize(out.residuals[:, i], stage)
        torch.testing.assert_close(out.per_sample_entropy[i], ref.per_sample_entropy)
        torch.testing.assert_close(out.codebook_entropy[i], ref.codebook_entropy)
    torch.testing.assert_close(out.commitment, (x - z_q).square().mean())
    expected = 0.1 * (out.per_sample_entropy - out.codebook_entropy).sum() + 0.3 * out.commitment
    torch.testing.assert_close(out.loss, expected)
    (g,) = torch.autograd.grad(z_q.sum(), [x])
    assert torch.equal(g, torch.ones_like(x))  # straight through, once


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_gives_the_forward_value(dtype: torch.dtype) -> None:
    cfg = lfq.ResidualLFQConfig(bits=4, num_quantizers=3, spherical=True)  # dim=1
    x = inputs((2, 4, 7)).to(dtype)
    z_q, out = lfq.quantize_residual(x, cfg)
    assert z_q.dtype == dtype and out.codes.shape == (2, 7, 3)
    assert out.histogram.shape == (3, 16) and out.residuals.shape == (2, 7, 4, 4)
    assert torch.equal(lfq.dequantize_residual(out.codes, cfg, dtype=dtype), z_q)


def test_mask_empty_batch_and_sync() -> None:
    cfg = lfq.ResidualLFQConfig(bits=4, num_quantizers=2, dim=-1, inv_temperature=2.0)
    x = inputs((3, 5, 4)).requires_grad_()
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 1], [1, 1, 1, 1, 1]]).bool()
    _, out = lfq.quantize_residual(x, cfg, mask=mask)
    _, ref = lfq.quantize_residual(x[mask], cfg)
    for name in ("loss", "per_sample_entropy", "codebook_entropy", "commitment"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), msg=name)
    assert torch.equal(out.histogram, ref.histogram)
    (g,) = torch.autograd.grad(out.loss, [x])
    assert torch.all(g[~mask] == 0)

    empty, eout = lfq.quantize_residual(torch.zeros(0, 4), cfg)
    assert empty.shape == (0, 4) and eout.codes.shape == (0, 2) and float(eout.loss) == 0

    b = inputs((9, 4), seed=4)
    record = UnionSync()
    lfq.quantize_residual(b, cfg, sync=record)
    a = inputs((6, 4), seed=5)
    _, synced = lfq.quantize_residual(a, cfg, sync=UnionSync(record.seen))
    _, union = lfq.quantize_residual(torch.cat([a, b]), cfg)
    torch.testing.assert_close(synced.loss, union.loss)
    torch.testing.assert_close(synced.codebook_entropy, union.codebook_entropy)


def test_errors() -> None:
    with pytest.raises(ValueError, match="num_quantizers must be a positive int, got 0"):
        lfq.ResidualLFQConfig(bits=4, num_quantizers=0)
    cfg = lfq.ResidualLFQConfig(bits=4, num_quantizers=2, dim=-1)
    with pytest.raises(TypeError, match=r"use vqfunc\.lfq\.quantize\)"):
        lfq.quantize_residual(torch.zeros(2, 4), lfq.LFQConfig(bits=4))
    with pytest.raises(ValueError, match="trailing axis of size num_quantizers=2"):
        lfq.dequantize_residual(torch.zeros(3, dtype=torch.long), cfg)
    assert math.isclose(lfq.ResidualLFQConfig(bits=4, spherical=True).code_scale, 0.5)
