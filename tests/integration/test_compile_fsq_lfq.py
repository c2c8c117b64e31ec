"""`torch.compile(fullgraph=True)` of FSQ and LFQ: one graph, no graph break, and no recompile on
new data (and new masks) of the same shapes. Slow on CPU: most graphs use the `aot_eager`
backend (the same capture, with the autograd of the custom entropy backward traced, without
code generation), one LFQ training step inductor."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from support.dynamo import assert_one_graph

import vqfunc
from vqfunc import fsq, lfq

pytestmark = pytest.mark.slow

STEPS = 3


def batches(features: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        yield torch.randn(4, 16, features, generator=g), torch.rand(4, 16, generator=g) > 0.4


def assert_same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        return
    for x, y in zip(a, b, strict=True):
        assert_same(x, y)


QUANTIZERS: dict[str, tuple[Callable[..., Any], int]] = {
    "fsq": (lambda x, m: fsq.quantize(x, fsq.FSQConfig(levels=(8, 5, 5, 5), dim=-1), mask=m), 4),
    "residual_fsq": (
        lambda x, m: fsq.quantize_residual(
            x, fsq.ResidualFSQConfig(levels=(8, 5, 5, 5), num_quantizers=3, dim=-1), mask=m
        ),
        4,
    ),
    "bsq": (
        lambda x, m: lfq.quantize(x, lfq.LFQConfig(bits=10, dim=-1, spherical=True), mask=m),
        10,
    ),
    "residual_lfq": (
        lambda x, m: lfq.quantize_residual(
            x, lfq.ResidualLFQConfig(bits=6, num_quantizers=2, dim=-1), mask=m
        ),
        6,
    ),
}


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_quantize_compiles_once(name: str, dynamo_counters: Any) -> None:
    function, features = QUANTIZERS[name]
    compiled = torch.compile(function, fullgraph=True, backend="aot_eager")
    for x, mask in batches(features):
        assert_same(compiled(x, mask), function(x, mask))
    assert_one_graph(dynamo_counters)


LFQ_CFG = lfq.LFQConfig(bits=8, dim=-1, inv_temperature=10.0)


def lfq_step(
    w: torch.Tensor, x: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode, quantize, reconstruction plus LFQ loss, one gradient step on the encoder."""

    def loss_fn(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = x @ w
        z_q, out = lfq.quantize(z, LFQ_CFG, mask=mask)
        return (z_q @ w.T - x).square().mean() + out.loss, out.codes

    grad, codes = torch.func.grad(loss_fn, has_aux=True)(w)
    return w - 0.1 * grad, codes


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_lfq_training_step_compiles_once(backend: str, dynamo_counters: Any) -> None:
    compiled = torch.compile(lfq_step, fullgraph=True, backend=backend)
    w = 0.3 * torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    w_ref = w.clone()
    for x, mask in batches(6):
        w, codes = compiled(w, x, mask)
        w_ref, codes_ref = lfq_step(w_ref, x, mask)
        torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
        assert torch.equal(codes, codes_ref)
    assert_one_graph(dynamo_counters)


def test_layers_in_a_compiled_model(dynamo_counters: Any) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), vqfunc.nn.FSQ((8, 5, 5, 5), dim=-1))
    lfq_layer = vqfunc.nn.LFQ(4, dim=-1)

    def forward(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        z_q, _ = model(x)
        _, misc = lfq_layer(z_q, mask=mask)
        return z_q.sum() + misc["loss"]

    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
    for x, mask in batches(6):
        torch.testing.assert_close(compiled(x, mask), forward(x, mask))
    assert_one_graph(dynamo_counters)
