"""`commitment_loss`: value and gradients against the formula, masks and empty inputs."""

from __future__ import annotations

import pytest
import torch

from vqfunc import commitment_loss


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.95, 1.0])
def test_value_and_gradient_split(beta: float, generator: torch.Generator) -> None:
    z = torch.randn(4, 3, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    z_q = torch.randn(4, 3, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    loss = commitment_loss(z, z_q, beta)
    n = z.numel()
    diff = (z - z_q).detach()
    # Both terms have the value mse(z, z_q); beta only splits the gradient between them.
    torch.testing.assert_close(loss, diff.square().sum() / n)
    loss.backward()
    torch.testing.assert_close(z.grad, (1 - beta) * 2 * diff / n)
    torch.testing.assert_close(z_q.grad, -beta * 2 * diff / n)


def test_mask_excludes_rows(generator: torch.Generator) -> None:
    z = torch.randn(6, 4, generator=generator)
    z_q = torch.randn(6, 4, generator=generator)
    mask = torch.tensor([True, False, True, True, False, False])
    loss = commitment_loss(z, z_q, 0.5, mask=mask)
    torch.testing.assert_close(loss, (z[mask] - z_q[mask]).square().mean())
    weights = torch.tensor([1.0, 0.0, 2.0, 0.5, 0.0, 0.0])
    weighted = commitment_loss(z, z_q, 0.5, mask=weights)
    per_row = (z - z_q).square().sum(-1)
    torch.testing.assert_close(weighted, (per_row * weights).sum() / (weights.sum() * 4))


def test_empty_and_fully_masked_inputs_give_zero() -> None:
    empty = torch.zeros(0, 3, requires_grad=True)
    loss = commitment_loss(empty, empty.detach().clone())
    assert float(loss.detach()) == 0.0
    loss.backward()
    z = torch.randn(2, 3)
    assert float(commitment_loss(z, z + 1, mask=torch.zeros(2, dtype=torch.bool))) == 0.0


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"z has shape \(3, 4\) but z_q has shape \(3, 5\)"):
        commitment_loss(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\], got 1.5"):
        commitment_loss(torch.zeros(3, 4), torch.zeros(3, 4), 1.5)
    with pytest.raises(ValueError, match=r"mask has shape \(4,\), expected .* \(3,\)"):
        commitment_loss(torch.zeros(3, 4), torch.zeros(3, 4), mask=torch.ones(4))


def test_quantize_loss_equals_commitment_loss_of_its_outputs(generator: torch.Generator) -> None:
    import vqfunc

    cfg = vqfunc.VQConfig(feature_size=6, num_codes=10, dim=-1, dist="cosine", groups=2, beta=0.4)
    params = vqfunc.init_params(cfg, generator=generator)
    x = torch.randn(7, 6, generator=generator)
    _, out = vqfunc.quantize(params, x, cfg)
    torch.testing.assert_close(out.loss, commitment_loss(out.z, out.codewords, cfg.beta))
