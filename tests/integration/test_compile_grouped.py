"""`torch.compile(fullgraph=True)` of a grouped residual-VQ training step: one graph."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from support.dynamo import assert_one_graph

import vqfunc
from vqfunc._replace import draw_replace_randomness
from vqfunc.residual import ResidualConfig

pytestmark = pytest.mark.slow  # compiling takes seconds on CPU

G = 2
CFG = ResidualConfig(
    feature_size=4, num_codes=(8, 6, 4), levels=3, share=False, dim=-1, replace_freq=2,
    ema_decay=0.9, quantizer_dropout=1.0, channel_groups=G,
)  # fmt: skip
PROJECTED = CFG.replace(codebook_dim=1, ema_decay=0.0)


def _step(cfg: ResidualConfig) -> Any:
    def step(params: Any, state: Any, x: torch.Tensor, depth: torch.Tensor, randomness: Any) -> Any:
        def loss_fn(params: Any) -> tuple[torch.Tensor, Any]:
            z_q, out = vqfunc.residual.quantize(params, x, cfg, depth=depth.view(-1, 1))
            return (z_q - x).square().mean() + out.loss, out

        grads, out = torch.func.grad(loss_fn, has_aux=True)(params)
        params = type(params)(*(p - 0.1 * g for p, g in zip(params, grads, strict=True)))
        return vqfunc.residual.update_state(params, state, out, cfg, randomness=randomness)

    return step


def _run(fn: Any, cfg: ResidualConfig) -> list[Any]:
    g = torch.Generator().manual_seed(0)
    params = vqfunc.residual.init_params(cfg, generator=g)
    state = vqfunc.residual.init_state(params, cfg)
    history = []
    for _ in range(3):
        x = torch.randn(6, 5, 4, generator=g)
        depth = vqfunc.residual.draw_dropout(cfg, 6, generator=g)
        draws = [draw_replace_randomness(30, cfg.group_config, generator=g) for _ in range(G)]
        randomness = type(draws[0])(*(torch.stack(t) for t in zip(*draws, strict=True)))
        params, state = fn(params, state, x, depth, randomness)
        history.append((params, state))
    return history


@pytest.mark.parametrize("cfg", [CFG, PROJECTED], ids=["ema", "projected"])
def test_grouped_step_compiles_to_one_graph(dynamo_counters: Any, cfg: ResidualConfig) -> None:
    compiled = _run(torch.compile(_step(cfg), fullgraph=True, backend="aot_eager"), cfg)
    assert_one_graph(dynamo_counters)
    for (p, s), (p_ref, s_ref) in zip(compiled, _run(_step(cfg), cfg), strict=True):
        for got, ref in zip(p, p_ref, strict=True):
            torch.testing.assert_close(got, ref)
        assert torch.equal(s.replace.counters, s_ref.replace.counters)
