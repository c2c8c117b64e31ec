"""LFQ, BSQ and symmetric FSQ against vector-quantize-pytorch (the `test` extra installs it).

vector-quantize-pytorch numbers an LFQ code's bits the other way round (its first feature is
the most significant bit); `their_index` converts. Two known differences are accounted for,
not hidden:

- it takes `log(max(p, 1e-5))` in its entropies, where vqfunc computes them exactly: each case
  computes the full float64 distributions and expects vector-quantize-pytorch's value to be
  vqfunc's minus the clamp's effect (zero where no probability is below 1e-5);
- with a mask, its batch entropy (1.32) averages no rows and equals its per-sample entropy: a
  masked vqfunc call is compared with its unmasked call on the kept rows.
"""

from __future__ import annotations

import pytest
import torch
from support.lfq_reference import code_distributions

from vqfunc import fsq, lfq

vqp = pytest.importorskip("vector_quantize_pytorch")


def their_index(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """vqfunc's LFQ code -> vector-quantize-pytorch's index (bit order reversed)."""
    return sum(((codes >> i) & 1) << (bits - 1 - i) for i in range(bits))


def test_bit_order_conversion() -> None:
    assert their_index(torch.tensor([0b0001, 0b0110, 0b1011]), 4).tolist() == [8, 6, 13]


def clamp_effect(rows: torch.Tensor, cfg: lfq.LFQConfig) -> tuple[float, float]:
    """How much `log(max(p, 1e-5))` lowers the per-sample and the codebook entropy of `rows`
    (`[N, bits]`), from the full float64 distributions."""
    z = rows.double()
    if cfg.spherical:
        z = torch.nn.functional.normalize(z, dim=-1) * cfg.scale
    p = code_distributions(z, cfg.code_scale, cfg.inv_temperature)

    def effect(q: torch.Tensor) -> torch.Tensor:
        exact = -torch.special.xlogy(q, q).sum(-1)
        clamped = -(q * q.clamp(min=1e-5).log()).sum(-1)
        return exact - clamped

    return float(effect(p).mean()), float(effect(p.mean(0)))


CASES = [
    # (bits, spherical, inv_temperature, scale): soft distributions (where the clamp hardly
    # acts), then the default temperature, where they are nearly one-hot.
    (4, False, 0.3, 1.0),
    (6, False, 0.1, 1.0),
    (8, False, 0.05, 1.0),
    (4, True, 0.5, 1.0),
    (8, True, 0.3, 1.0),
    (6, True, 1.0, 2.0),
    (8, False, 100.0, 1.0),
    (10, False, 100.0, 1.0),
    (10, True, 100.0, 1.0),
]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("bits", "spherical", "inv_temperature", "scale"), CASES)
def test_lfq_and_bsq_match(
    bits: int, spherical: bool, inv_temperature: float, scale: float, masked: bool
) -> None:
    cfg = lfq.LFQConfig(
        bits=bits,
        dim=-1,
        entropy_weight=0.1,
        diversity_gamma=1.3,
        commitment_weight=0.25,
        inv_temperature=inv_temperature,
        spherical=spherical,
        scale=scale,
    )
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(4, 50, bits, generator=g)
    mask = torch.rand(4, 50, generator=g) > 0.3 if masked else None
    theirs = vqp.LFQ(
        dim=bits,
        codebook_size=2**bits,
        entropy_loss_weight=0.1,
        diversity_gamma=1.3,
        commitment_loss_weight=0.25,
        spherical=spherical,
        codebook_scale=scale,
    ).train()
    kept = x if mask is None else x[mask].unsqueeze(0)
    (quantized, indices, aux_loss), breakdown = theirs(
        kept, inv_temperature=inv_temperature, return_loss_breakdown=True
    )
    z_q, out = lfq.quantize(x, cfg, mask=mask)
    if mask is not None:
        z_q, codes = z_q[mask].unsqueeze(0), out.codes[mask].unsqueeze(0)
    else:
        codes = out.codes
    assert torch.equal(their_index(codes, bits), indices.long())
    torch.testing.assert_close(z_q, quantized, rtol=0, atol=1e-6)
    per_sample_effect, codebook_effect = clamp_effect(kept.reshape(-1, bits), cfg)
    per_sample = out.per_sample_entropy - per_sample_effect
    codebook = out.codebook_entropy - codebook_effect
    torch.testing.assert_close(per_sample, breakdown.per_sample_entropy, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(codebook, breakdown.batch_entropy, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(out.commitment, breakdown.commitment, rtol=1e-5, atol=1e-7)
    loss = out.loss - 0.1 * (per_sample_effect - 1.3 * codebook_effect)
    torch.testing.assert_close(loss, aux_loss, rtol=1e-4, atol=1e-5)
    # The implicit codebooks hold the same vectors, in the converted order.
    order = their_index(torch.arange(2**bits), bits)
    torch.testing.assert_close(
        lfq.implicit_codebook(cfg), theirs.indices_to_codes(order.unsqueeze(0))[0],
        rtol=0, atol=1e-6,
    )  # fmt: skip


def test_residual_lfq_matches() -> None:
    bits, stages = 6, 3
    cfg = lfq.ResidualLFQConfig(bits=bits, num_quantizers=stages, dim=-1, commitment_weight=0.0)
    theirs = vqp.ResidualLFQ(
        dim=bits, codebook_size=2**bits, num_quantizers=stages, entropy_loss_weight=0.1
    ).train()
    x = torch.randn(2, 60, bits, generator=torch.Generator().manual_seed(0))
    quantized, indices, losses = theirs(x)
    z_q, out = lfq.quantize_residual(x, cfg)
    assert torch.equal(their_index(out.codes, bits), indices.long())
    torch.testing.assert_close(z_q, quantized, rtol=0, atol=1e-6)
    # Each stage's auxiliary loss, at the default inverse temperature (100).
    ours = 0.1 * (out.per_sample_entropy - out.codebook_entropy)
    torch.testing.assert_close(ours, losses.reshape(-1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (2, 3, 4), (7, 6)], ids=str)
def test_symmetric_fsq_matches(levels: tuple[int, ...]) -> None:
    # vector-quantize-pytorch's default grid shifts by arctanh with a (1 + eps) margin, not
    # the paper's tan and (1 - eps); its symmetric grid is the formula vqfunc implements.
    theirs = vqp.FSQ(levels=list(levels), preserve_symmetry=True)
    x = 2 * torch.randn(3, 200, len(levels), generator=torch.Generator().manual_seed(1))
    quantized, indices = theirs(x)
    z_q, out = fsq.quantize(x, fsq.FSQConfig(levels=levels, dim=-1, preserve_symmetry=True))
    assert torch.equal(out.codes, indices.long())
    torch.testing.assert_close(z_q, quantized, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        fsq.implicit_codebook(fsq.FSQConfig(levels=levels, preserve_symmetry=True)),
        theirs.implicit_codebook,
        rtol=0, atol=1e-6,
    )  # fmt: skip
