"""`vqfunc.lfq`: LFQ and BSQ codes and values, the factorised and chunked entropy terms against
the full `2**bits` computation in float64 (`support.lfq_reference`), masks, gradients."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from support.lfq_reference import all_codes, entropy_terms
from support.union_sync import UnionSync

from vqfunc import lfq
from vqfunc.lfq import _entropy


def inputs(
    shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def normalised(x: torch.Tensor, cfg: lfq.LFQConfig) -> torch.Tensor:
    return F.normalize(x, dim=-1) * cfg.scale if cfg.spherical else x


@pytest.mark.parametrize("spherical", [False, True])
def test_codes_and_values_are_the_signs(spherical: bool) -> None:
    cfg = lfq.LFQConfig(bits=5, dim=-1, spherical=spherical, scale=2.0)
    x = inputs((40, 5))
    x[0] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3.0])
    z_q, out = lfq.quantize(x, cfg)
    magnitude = 2.0 / math.sqrt(5) if spherical else 2.0
    assert cfg.code_scale == magnitude
    m = torch.tensor(magnitude, dtype=torch.float64)
    assert torch.equal(z_q, torch.where(x > 0, m, -m))
    expected = ((x > 0).long() * 2 ** torch.arange(5)).sum(-1)
    assert torch.equal(out.codes, expected) and out.codes.dtype == torch.int64
    assert out.codes[0] == 4 + 16  # 0 is not positive: bit 0
    assert torch.equal(lfq.dequantize(out.codes, cfg, dtype=torch.float64), z_q)
    assert torch.equal(lfq.implicit_codebook(cfg, dtype=torch.float64)[out.codes], z_q)
    assert torch.equal(lfq.implicit_codebook(cfg, dtype=torch.float64), all_codes(5, magnitude))
    if spherical:
        torch.testing.assert_close(out.z.norm(dim=-1), torch.full((40,), 2.0, dtype=torch.float64))
        torch.testing.assert_close(z_q.norm(dim=-1), torch.full((40,), 2.0, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dequantize_gives_the_forward_value(dtype: torch.dtype) -> None:
    cfg = lfq.LFQConfig(bits=7, dim=1, spherical=True)
    x = inputs((3, 7, 4), dtype=torch.float32).to(dtype)
    z_q, out = lfq.quantize(x, cfg)
    assert z_q.dtype == dtype and z_q.shape == x.shape and out.codes.shape == (3, 4)
    assert torch.equal(lfq.dequantize(out.codes, cfg, dtype=dtype), z_q)
    _, out32 = lfq.quantize(x.float(), cfg)
    assert torch.equal(out.codes, out32.codes)


@pytest.mark.parametrize("spherical", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
def test_entropies_equal_the_full_computation(bits: int, spherical: bool) -> None:
    cfg = lfq.LFQConfig(bits=bits, dim=-1, spherical=spherical, inv_temperature=3.0)
    x = inputs((64, bits), seed=bits).requires_grad_()
    _, out = lfq.quantize(x, cfg)
    z = normalised(x, cfg)
    per_sample, codebook = entropy_terms(z, cfg.code_scale, cfg.inv_temperature)
    torch.testing.assert_close(out.per_sample_entropy, per_sample, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.codebook_entropy, codebook, rtol=1e-12, atol=1e-12)
    for ours, theirs in ((out.per_sample_entropy, per_sample), (out.codebook_entropy, codebook)):
        (g,) = torch.autograd.grad(ours, [x], retain_graph=True)
        (g_ref,) = torch.autograd.grad(theirs, [x], retain_graph=True)
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("chunk_elements", [1, 7, 64, 1 << 20])
def test_chunking_changes_nothing(monkeypatch: pytest.MonkeyPatch, chunk_elements: int) -> None:
    monkeypatch.setattr(_entropy, "CHUNK_ELEMENTS", chunk_elements)
    cfg = lfq.LFQConfig(bits=6, dim=-1, inv_temperature=2.0)
    x = inputs((50, 6), seed=1).requires_grad_()
    mask = inputs((50,), seed=2) > -0.5
    _, out = lfq.quantize(x, cfg, mask=mask)
    per_sample, codebook = entropy_terms(x, 1.0, 2.0, weights=mask)
    torch.testing.assert_close(out.codebook_entropy, codebook, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.per_sample_entropy, per_sample, rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(out.codebook_entropy, [x], retain_graph=True)
    (g_ref,) = torch.autograd.grad(codebook, [x])
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


def test_codebook_entropy_passes_gradcheck() -> None:
    logits = inputs((9, 5), seed=3).mul(2).requires_grad_()
    weights = torch.tensor([1.0, 0.0, 0.5, 1, 1, 1, 2, 1, 1], dtype=torch.float64)

    def entropy(a: torch.Tensor) -> torch.Tensor:
        mean = _entropy.code_mass(a, weights) / weights.sum()
        return _entropy.codebook_entropy(a, weights, mean, 1 / weights.sum())

    assert torch.autograd.gradcheck(entropy, (logits,))


def test_loss_combines_the_terms_and_commitment_is_the_mse() -> None:
    cfg = lfq.LFQConfig(
        bits=4, dim=-1, entropy_weight=0.3, diversity_gamma=0.7, commitment_weight=0.2
    )
    x = inputs((30, 4)).requires_grad_()
    z_q, out = lfq.quantize(x, cfg)
    commitment = (x - z_q.detach()).square().mean()
    torch.testing.assert_close(out.commitment, commitment)
    expected = 0.3 * (out.per_sample_entropy - 0.7 * out.codebook_entropy) + 0.2 * commitment
    torch.testing.assert_close(out.loss, expected)
    (g,) = torch.autograd.grad(out.commitment, [x])
    torch.testing.assert_close(g, 2 * (x - z_q).detach() / x.numel())


@pytest.mark.parametrize("spherical", [False, True])
def test_straight_through_gradient(spherical: bool) -> None:
    cfg = lfq.LFQConfig(bits=6, dim=-1, spherical=spherical)
    x = inputs((10, 6)).requires_grad_()
    weight = inputs((10, 6), seed=5)
    (g,) = torch.autograd.grad((lfq.quantize(x, cfg)[0] * weight).sum(), [x])
    (g_ref,) = torch.autograd.grad((normalised(x, cfg) * weight).sum(), [x])
    torch.testing.assert_close(g, g_ref)


def test_sharp_distributions_stay_finite() -> None:
    cfg = lfq.LFQConfig(bits=10, dim=-1, inv_temperature=1e4)
    x = inputs((256, 10)).requires_grad_()
    _, out = lfq.quantize(x, cfg)
    (g,) = torch.autograd.grad(out.loss, [x])
    assert torch.isfinite(g).all() and torch.isfinite(out.loss)
    assert 0 <= float(out.per_sample_entropy.detach()) < 1e-3
    # Nearly one-hot distributions: the codebook entropy is that of the codes' histogram.
    p = out.histogram[0] / 256
    torch.testing.assert_close(
        out.codebook_entropy, -torch.special.xlogy(p, p).sum().double(), rtol=1e-4, atol=1e-4
    )


def test_masked_rows_count_in_no_statistic() -> None:
    cfg = lfq.LFQConfig(bits=5, dim=-1, inv_temperature=2.0)
    x = inputs((4, 6, 5)).requires_grad_()
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(1)) > 0.4
    z_q, out = lfq.quantize(x, cfg, mask=mask)
    kept = x[mask]
    z_q_kept, ref = lfq.quantize(kept, cfg)
    assert torch.equal(z_q[mask], z_q_kept)
    for name in ("loss", "per_sample_entropy", "codebook_entropy", "commitment", "perplexity"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), msg=name)
    assert torch.equal(out.histogram, ref.histogram) and torch.equal(out.usage, ref.usage)
    (g,) = torch.autograd.grad(out.loss, [x])
    (g_kept,) = torch.autograd.grad(ref.loss, [kept])
    assert torch.all(g[~mask] == 0)
    torch.testing.assert_close(g[mask], g_kept)
    # Float weights act as row weights.
    _, weighted = lfq.quantize(x, cfg, mask=mask.double())
    torch.testing.assert_close(weighted.loss, out.loss)


@pytest.mark.parametrize("shape", [(0, 6), (3, 0, 6), (6,)])
def test_any_rank_and_empty_batches(shape: tuple[int, ...]) -> None:
    cfg = lfq.LFQConfig(bits=6, dim=-1)
    x = torch.randn(shape, requires_grad=True)
    z_q, out = lfq.quantize(x, cfg)
    assert z_q.shape == x.shape and out.codes.shape == shape[:-1]
    (g,) = torch.autograd.grad(out.loss + z_q.sum(), [x])
    assert g.shape == x.shape and torch.isfinite(g).all()
    if x.numel() == 0:
        assert float(out.loss.detach()) == 0 and float(out.codebook_entropy.detach()) == 0
        assert float(out.histogram.sum()) == 0
    # A fully masked batch is like an empty one.
    _, masked = lfq.quantize(x, cfg, mask=torch.zeros(shape[:-1], dtype=torch.bool))
    assert float(masked.loss.detach()) == 0
    assert float(masked.per_sample_entropy.detach()) == 0


def test_eighteen_bits_forward_and_backward() -> None:
    cfg = lfq.LFQConfig(bits=18, dim=-1, inv_temperature=1.0)
    x = torch.randn(2, 64, 18, generator=torch.Generator().manual_seed(0), requires_grad=True)
    _, out = lfq.quantize(x, cfg)
    (g,) = torch.autograd.grad(out.loss, [x])
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert out.histogram.shape == (1, 1 << 18) and float(out.histogram.sum()) == 128
    assert 0 < float(out.codebook_entropy.detach()) <= 18 * math.log(2) + 1e-4
    # The batch mean is a distribution: its mass is 1.
    logits = 4.0 * out.z.reshape(-1, 18).detach()
    total = _entropy.code_mass(logits, None).sum()
    torch.testing.assert_close(total, torch.tensor(128.0), rtol=1e-4, atol=0)


@given(bits=st.integers(1, 9), seed=st.integers(0, 2**16), masked=st.booleans())
def test_code_mass_is_the_sum_of_the_distributions(bits: int, seed: int, masked: bool) -> None:
    z = inputs((20, bits), seed=seed)
    weights = (inputs((20,), seed=seed + 1) > 0).double() if masked else None
    mass = _entropy.code_mass(4.0 * z, weights)
    codes = all_codes(bits, 1.0)
    p = torch.softmax(-(z.unsqueeze(1) - codes).square().sum(-1), dim=-1)
    w = torch.ones(20, dtype=torch.float64) if weights is None else weights
    torch.testing.assert_close(mass, (p * w.unsqueeze(1)).sum(0), rtol=1e-12, atol=1e-15)


def test_sync_gives_the_loss_of_the_union_and_scaled_gradients() -> None:
    cfg = lfq.LFQConfig(bits=6, dim=-1, inv_temperature=2.0, commitment_weight=0.5)
    a = inputs((20, 6), seed=1).requires_grad_()
    b = inputs((13, 6), seed=2) + 0.5
    record = UnionSync()
    lfq.quantize(b, cfg, sync=record)
    assert record.seen is not None
    _, out = lfq.quantize(a, cfg, sync=UnionSync(record.seen))
    union = torch.cat([a, b]).detach().requires_grad_()
    _, ref = lfq.quantize(union, cfg)
    for name in ("loss", "per_sample_entropy", "codebook_entropy", "commitment"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), msg=name)
    (g,) = torch.autograd.grad(out.loss, [a])
    (g_ref,) = torch.autograd.grad(ref.loss, [union])
    # Two ranks: each rank's rows get twice the union loss's gradient (DDP averages).
    torch.testing.assert_close(g, 2 * g_ref[:20])
    assert out.histogram.sum() == 20  # the statistics stay this rank's


def test_configuration_errors_name_the_field() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"bits": 0}, r"bits must be an int in \[1, 30\]"),
        ({"bits": 31}, r"bits must be an int in \[1, 30\]"),
        ({"bits": 4, "inv_temperature": 0.0}, "inv_temperature must be a finite number > 0"),
        ({"bits": 4, "scale": -1.0}, "scale must be a finite number > 0"),
        ({"bits": 4, "entropy_weight": -0.1}, "entropy_weight must be a finite number >= 0"),
        ({"bits": 4, "diversity_gamma": math.nan}, "diversity_gamma must be a finite number"),
    ]
    for fields, message in cases:
        with pytest.raises(ValueError, match=message):
            lfq.LFQConfig(**fields)
    with pytest.raises(TypeError, match="spherical must be True or False"):
        lfq.LFQConfig(bits=4, spherical=1)  # type: ignore[arg-type]
    cfg = lfq.LFQConfig(bits=4)
    assert cfg.codebook_size == 16 and cfg.feature_size == 4 and hash(cfg) == hash(cfg.replace())
    with pytest.raises(ValueError, match=r"3 features on dim=-1 .*feature_size is 4"):
        lfq.quantize(torch.zeros(2, 3), cfg.replace(dim=-1))
    with pytest.raises(TypeError, match=r"use vqfunc\.lfq\.quantize_residual"):
        lfq.quantize(torch.zeros(2, 4), lfq.ResidualLFQConfig(bits=4))
    with pytest.raises(ValueError, match=r"mask has shape \(3,\), expected \(2,\)"):
        lfq.quantize(torch.zeros(2, 4), cfg.replace(dim=-1), mask=torch.ones(3))
    with pytest.raises(TypeError, match="codes must be an integer tensor"):
        lfq.dequantize(torch.zeros(3), cfg)
