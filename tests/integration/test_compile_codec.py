"""`torch.compile(fullgraph=True)` of residual-VQ codec steps: quantizer dropout as an input
tensor (no recompile whatever the depths), and `n_levels` (one graph per value, then none)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from support.dynamo import assert_one_graph

import vqfunc
from vqfunc._replace import draw_replace_randomness
from vqfunc.residual import ResidualConfig

pytestmark = pytest.mark.slow  # compiling takes seconds on CPU

CFG = ResidualConfig(
    feature_size=4, num_codes=(8, 6, 4), levels=3, share=False, dim=-1, replace_freq=2,
    quantizer_dropout=1.0, dropout_per="sample",
)  # fmt: skip
# DAC's factorised lookup: projections to 2-D codes, cosine search.
PROJECTED = CFG.replace(codebook_dim=2, dist="cosine")


def make_step(cfg: ResidualConfig) -> Any:
    def step(
        params: Any,
        state: vqfunc.residual.ResidualState,
        enc: torch.Tensor,
        x: torch.Tensor,
        depth: torch.Tensor,
        randomness: Any,
    ) -> tuple[Any, vqfunc.residual.ResidualState, torch.Tensor]:
        def loss_fn(enc: torch.Tensor) -> tuple[torch.Tensor, vqfunc.residual.ResidualOutput]:
            z = x @ enc
            z_q, out = vqfunc.residual.quantize(params, z, cfg, depth=depth.view(-1, 1))
            return (z_q - z).square().mean() + out.loss, out

        grad, out = torch.func.grad(loss_fn, has_aux=True)(enc)
        params, state = vqfunc.residual.update_state(params, state, out, cfg, randomness=randomness)
        return params, state, enc - 0.1 * grad

    return step


def _run(fn: Any, cfg: ResidualConfig, steps: int = 4) -> list[Any]:
    g = torch.Generator().manual_seed(0)
    params = vqfunc.residual.init_params(cfg, generator=g)
    state = vqfunc.residual.init_state(params, cfg)
    enc = 0.5 * torch.randn(3, 4, generator=g)
    history = []
    for _ in range(steps):
        x = torch.randn(6, 5, 3, generator=g)
        depth = vqfunc.residual.draw_dropout(cfg, 6, generator=g)
        randomness = draw_replace_randomness(30, cfg, generator=g)
        params, state, enc = fn(params, state, enc, x, depth, randomness)
        history.append((params, state, enc, depth))
    return history


@pytest.mark.parametrize("cfg", [CFG, PROJECTED], ids=["per_level_sizes", "projected"])
def test_dropout_steps_compile_to_one_graph(dynamo_counters: Any, cfg: ResidualConfig) -> None:
    step = make_step(cfg)
    compiled = _run(torch.compile(step, fullgraph=True, backend="aot_eager"), cfg)
    assert_one_graph(dynamo_counters)
    eager = _run(step, cfg)
    assert len({tuple(h[3].tolist()) for h in eager}) > 1  # the depths did change
    for (p, s, e, _), (p_ref, s_ref, e_ref, _) in zip(compiled, eager, strict=True):
        torch.testing.assert_close(p.codebook, p_ref.codebook)
        assert torch.equal(s.replace.counters, s_ref.replace.counters)
        torch.testing.assert_close(e, e_ref)


def test_each_n_levels_is_one_graph_compiled_once() -> None:
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    params = vqfunc.residual.init_params(CFG, generator=torch.Generator().manual_seed(1))

    def encode(x: torch.Tensor, n: int) -> torch.Tensor:
        return vqfunc.residual.quantize(params, x, CFG, n_levels=n)[0]

    compiled = torch.compile(encode, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        for n in (1, 2, 3):
            x = torch.randn(7, 4)
            torch.testing.assert_close(compiled(x, n), encode(x, n))
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 3  # one per n_levels, none on the second pass
    torch._dynamo.reset()
