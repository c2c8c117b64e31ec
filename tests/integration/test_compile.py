"""`torch.compile(fullgraph=True)` of whole training steps: no graph break, no recompile.

Compiling is slow on CPU (tens of seconds per graph with inductor), so the suite compiles two
functions: a functional training step with inductor, and a model holding the layer shim with
the `aot_eager` backend (the same graph capture, without code generation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from support.dynamo import assert_one_graph
from torch import nn

import vqfunc
from vqfunc._replace import draw_replace_randomness
from vqfunc._state import init_state, update_state

# Every test here compiles (seconds to tens of seconds on CPU).
pytestmark = pytest.mark.slow

STEPS = 3

CFG = vqfunc.VQConfig(feature_size=8, num_codes=16, dim=-1, replace_freq=2, ema_decay=0.9)


def functional_step(
    params: vqfunc.VQParams,
    state: Any,
    enc: torch.Tensor,
    x: torch.Tensor,
    randomness: Any,
    broken: torch.Tensor,
) -> tuple[vqfunc.VQParams, Any, torch.Tensor]:
    """Encode, quantize, loss, gradient of the encoder, then EMA and dead-code replacement.

    The encoder's output rows where `broken` `[N]` is True are NaN (a numerical failure
    upstream): the quantizer leaves them out, and the task loss masks them with `out.valid`.
    """

    def loss_fn(enc: torch.Tensor) -> tuple[torch.Tensor, vqfunc.QuantizeOutput]:
        z = torch.where(broken.unsqueeze(-1), torch.nan, x @ enc)
        z_q, out = vqfunc.quantize(params, z, CFG)
        error = torch.where(out.valid.unsqueeze(-1), z_q - z, 0.0)
        return error.square().mean() + out.loss, out

    grad, out = torch.func.grad(loss_fn, has_aux=True)(enc)
    params, state = update_state(params, state, out, CFG, randomness=randomness)
    return params, state, enc - 0.1 * grad


def run_functional(step: Callable[..., Any]) -> list[Any]:
    g = torch.Generator().manual_seed(0)
    params = vqfunc.init_params(CFG, generator=g)
    state = init_state(params, CFG)
    enc = 0.3 * torch.randn(6, 8, generator=g)
    history = []
    for i in range(STEPS):
        x = torch.randn(32, 6, generator=g)
        randomness = draw_replace_randomness(32, CFG, generator=g)
        broken = (torch.arange(32) % 5 == 0) & (i == 1)  # NaN rows on the second step
        params, state, enc = step(params, state, enc, x, randomness, broken)
        history.append((params, state, enc))
    return history


def test_compiled_functional_training_step(dynamo_counters: Any) -> None:
    compiled = run_functional(torch.compile(functional_step, fullgraph=True))
    assert_one_graph(dynamo_counters)
    eager = run_functional(functional_step)
    for (p, s, e), (p_ref, s_ref, e_ref) in zip(compiled, eager, strict=True):
        torch.testing.assert_close(p.codebook, p_ref.codebook, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s.ema.counts, s_ref.ema.counts, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s.ema.sums, s_ref.ema.sums, rtol=1e-5, atol=1e-5)
        assert torch.equal(s.replace.counters, s_ref.replace.counters)
        torch.testing.assert_close(e, e_ref, rtol=1e-5, atol=1e-5)
    # The NaN rows of the second step reached no parameter or state tensor.
    for p, s, e in compiled:
        assert p.codebook.isfinite().all() and e.isfinite().all()
        assert s.ema.counts.isfinite().all() and s.ema.sums.isfinite().all()
    # The steps did move the state (so that the comparison above means something).
    counters = [s.replace.counters for _, s, _ in eager]
    assert not all(torch.equal(counters[0], c) for c in counters[1:])


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 8)
        self.vq = vqfunc.VectorQuantize(
            8, 16, dim=-1, replace_freq=2, ema_decay=0.9, kmeans_init=True
        )
        self.dec = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z_q, misc = self.vq(self.enc(x))
        return (self.dec(z_q) - x).square().mean() + misc["loss"]


def train_net(compile_model: bool) -> nn.Module:
    torch.manual_seed(0)
    net = Net()
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.05)
    net(torch.randn(32, 6))  # the k-means warm-up runs eagerly, once
    model = torch.compile(net, fullgraph=True, backend="aot_eager") if compile_model else net
    for _ in range(STEPS):
        loss = model(torch.randn(32, 6))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net


def test_compiled_model_with_the_layer_shim(dynamo_counters: Any) -> None:
    compiled = train_net(compile_model=True)
    assert_one_graph(dynamo_counters)
    eager = train_net(compile_model=False)
    state, ref = compiled.state_dict(), eager.state_dict()
    assert state.keys() == ref.keys()
    for key in ref:
        if ref[key].is_floating_point():
            torch.testing.assert_close(state[key], ref[key], rtol=1e-5, atol=1e-6, msg=key)
        else:
            assert torch.equal(state[key], ref[key]), key
    # The compiled steps did update the layer's buffers in place.
    fresh = Net().vq.state_dict()
    assert not torch.equal(compiled.vq.ema_counts, fresh["ema_counts"])
