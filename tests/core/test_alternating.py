"""Alternating optimisation: the codebook step against a hand-derived gradient."""

from __future__ import annotations

import pytest
import torch

import vqfunc
from vqfunc._affine import affine_scale_bias


def _hand_gradient(codebook: torch.Tensor, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """d/dC of mean_{i, j} (C[q_i]_j - x_ij)^2 = 2 / (M d) * sum_{i: q_i = k} (C_k - x_i)."""
    m, d = x.shape
    grad = torch.zeros_like(codebook)
    for i in range(m):
        grad[codes[i]] += 2.0 / (m * d) * (codebook[codes[i]] - x[i])
    return grad


def _setup() -> tuple[vqfunc.VQConfig, vqfunc.VQParams, torch.Tensor]:
    cfg = vqfunc.VQConfig(feature_size=3, num_codes=5, dim=-1)
    g = torch.Generator().manual_seed(0)
    params = vqfunc.init_params(cfg, generator=g, dtype=torch.float64)
    return cfg, params, torch.randn(11, 3, generator=g, dtype=torch.float64)


def test_step_equals_a_manual_sgd_step_on_the_formula() -> None:
    cfg, params, x = _setup()
    _, out = vqfunc.quantize(params, x, cfg)
    new = vqfunc.alternating_step(params, out.z, out.codes, cfg, lr=0.7)
    expected = params.codebook - 0.7 * _hand_gradient(params.codebook, x, out.codes)
    torch.testing.assert_close(new.codebook, expected)
    loss = vqfunc.codebook_loss(params, out.z, out.codes, cfg)
    torch.testing.assert_close(loss, (params.codebook[out.codes] - x).square().mean())


def test_affine_step_moves_the_raw_codebook_only() -> None:
    cfg = vqfunc.VQConfig(feature_size=3, num_codes=4, dim=-1, affine_lr=2.0)
    g = torch.Generator().manual_seed(1)
    params = vqfunc.init_params(cfg, generator=g, dtype=torch.float64)
    params = params._replace(
        affine_scale=torch.randn(1, 3, generator=g, dtype=torch.float64) * 0.1,
        affine_bias=torch.randn(1, 3, generator=g, dtype=torch.float64),
    )
    x = torch.randn(9, 3, generator=g, dtype=torch.float64)
    _, out = vqfunc.quantize(params, x, cfg)
    new = vqfunc.alternating_step(params, out.z, out.codes, cfg, lr=0.5)
    scale, bias = affine_scale_bias(params, cfg)
    effective = params.codebook * scale + bias
    # Chain rule through c' = s * c + b: d/dc = s * d/dc'.
    expected = params.codebook - 0.5 * scale * _hand_gradient(effective, x, out.codes)
    torch.testing.assert_close(new.codebook, expected)
    assert torch.equal(new.affine_scale, params.affine_scale)


def test_masked_rows_do_not_count() -> None:
    cfg, params, x = _setup()
    mask = torch.tensor([True, False] * 5 + [True])
    _, out = vqfunc.quantize(params, x, cfg, mask=mask)
    new = vqfunc.alternating_step(params, out.z, out.codes, cfg, lr=1.0, mask=mask)
    expected = params.codebook - _hand_gradient(params.codebook, x[mask], out.codes[mask])
    torch.testing.assert_close(new.codebook, expected)


def test_layer_inplace_optimizer_steps_before_quantizing() -> None:
    lr = 3.0
    layer = vqfunc.VectorQuantize(
        3, 5, dim=-1, dtype=torch.float64, inplace_optimizer=lambda p: torch.optim.SGD(p, lr=lr)
    )
    x = torch.randn(11, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    before = layer.codebook.detach().clone()
    accumulated = torch.ones_like(before)
    layer.codebook.grad = accumulated.clone()
    _, first = vqfunc.quantize(vqfunc.VQParams(*(p.detach() for p in layer.params)), x, layer.cfg)
    z_q, _ = layer(x)
    expected = before - lr * _hand_gradient(before, x, first.codes)
    torch.testing.assert_close(layer.codebook.detach(), expected)
    # The output is the batch quantized with the updated codebook.
    updated = vqfunc.VQParams(*(p.detach() for p in layer.params))
    torch.testing.assert_close(z_q, vqfunc.quantize(updated, x, layer.cfg)[0])
    assert torch.equal(layer.codebook.grad, accumulated)  # the task's gradient is kept
    layer.eval()
    layer(x)
    torch.testing.assert_close(layer.codebook.detach(), expected)  # eval: no step


def test_layer_inplace_optimizer_momentum_matches_torch_sgd() -> None:
    def make() -> torch.optim.Optimizer:
        return torch.optim.SGD([ref], lr=50.0, momentum=0.9)

    layer = vqfunc.VectorQuantize(
        4,
        6,
        dim=-1,
        generator=torch.Generator().manual_seed(0),
        inplace_optimizer=lambda p: torch.optim.SGD(p, lr=50.0, momentum=0.9),
    )
    ref = torch.nn.Parameter(layer.codebook.detach().clone())
    opt = make()
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(10, 4, generator=g)
        cfg = layer.cfg
        _, out = vqfunc.quantize(vqfunc.VQParams(ref.detach(), *layer.params[1:]), x, cfg)
        ref.grad = _hand_gradient(ref.detach(), x, out.codes)
        opt.step()
        layer(x)
        torch.testing.assert_close(layer.codebook.detach(), ref.detach(), rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_refused() -> None:
    cfg, params, x = _setup()
    _, out = vqfunc.quantize(params, x, cfg)
    with pytest.raises(ValueError, match="lr must be a number >= 0"):
        vqfunc.alternating_step(params, out.z, out.codes, cfg, lr=-1.0)
    with pytest.raises(ValueError, match="inplace_optimizer and ema_decay"):
        vqfunc.VectorQuantize(
            3, 4, ema_decay=0.9, inplace_optimizer=lambda p: torch.optim.SGD(p, lr=1.0)
        )
    with pytest.raises(TypeError, match="inplace_optimizer must be a callable"):
        vqfunc.VectorQuantize(3, 4, inplace_optimizer=1.0)  # type: ignore[arg-type]
