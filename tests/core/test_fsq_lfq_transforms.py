"""FSQ and LFQ under `torch.func`: `grad` equals autograd, `vmap` (over a stack of batches,
masks included) equals a Python loop, and `vmap` of `grad` equals the loop of gradients."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from vqfunc import fsq, lfq

FSQ_CFG = fsq.FSQConfig(levels=(8, 5, 5), dim=-1)
RFSQ_CFG = fsq.ResidualFSQConfig(levels=(8, 5, 5), num_quantizers=2, dim=-1)
LFQ_CFG = lfq.LFQConfig(bits=5, dim=-1, inv_temperature=2.0)
BSQ_CFG = lfq.LFQConfig(bits=5, dim=-1, spherical=True, inv_temperature=5.0)
RLFQ_CFG = lfq.ResidualLFQConfig(bits=5, num_quantizers=2, dim=-1, inv_temperature=2.0)

# name -> (function of (x, mask) giving (z_q, out), the loss of out, features)
CASES: dict[str, tuple[Any, Any, int]] = {
    "fsq": (lambda x, m: fsq.quantize(x, FSQ_CFG, mask=m), lambda out: out.perplexity, 3),
    "rfsq": (lambda x, m: fsq.quantize_residual(x, RFSQ_CFG, mask=m), lambda out: 0.0, 3),
    "lfq": (lambda x, m: lfq.quantize(x, LFQ_CFG, mask=m), lambda out: out.loss, 5),
    "bsq": (lambda x, m: lfq.quantize(x, BSQ_CFG, mask=m), lambda out: out.loss, 5),
    "rlfq": (lambda x, m: lfq.quantize_residual(x, RLFQ_CFG, mask=m), lambda out: out.loss, 5),
}


def data(features: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 16, features, dtype=torch.float64, generator=g)
    mask = torch.rand(3, 16, generator=g) > 0.3
    weight = torch.randn(3, 16, features, dtype=torch.float64, generator=g)
    return x, mask, weight


def objective(name: str, x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    quantize, loss, _ = CASES[name]
    z_q, out = quantize(x, mask)
    return (z_q * weight).sum() + loss(out)


@pytest.mark.parametrize("name", list(CASES))
def test_grad_equals_autograd(name: str) -> None:
    x, mask, weight = data(CASES[name][2])
    grad = torch.func.grad(lambda x: objective(name, x, mask[0], weight[0]))(x[0])
    leaf = x[0].clone().requires_grad_()
    (expected,) = torch.autograd.grad(objective(name, leaf, mask[0], weight[0]), [leaf])
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_vmap_over_batches_equals_a_loop(name: str) -> None:
    quantize, _, features = CASES[name]
    x, mask, _ = data(features, seed=1)
    z_q, out = torch.func.vmap(quantize)(x, mask)
    for i in range(3):
        z_ref, ref = quantize(x[i], mask[i])
        torch.testing.assert_close(z_q[i], z_ref, rtol=0, atol=0)
        for field, value in ref._asdict().items():
            torch.testing.assert_close(getattr(out, field)[i], value, msg=field)


@pytest.mark.parametrize("name", list(CASES))
def test_vmap_of_grad_equals_a_loop_of_grads(name: str) -> None:
    x, mask, weight = data(CASES[name][2], seed=2)
    grads = torch.func.vmap(torch.func.grad(lambda x, m, w: objective(name, x, m, w)))(
        x, mask, weight
    )
    for i in range(3):
        leaf = x[i].clone().requires_grad_()
        (expected,) = torch.autograd.grad(objective(name, leaf, mask[i], weight[i]), [leaf])
        torch.testing.assert_close(grads[i], expected, rtol=1e-10, atol=1e-12)
