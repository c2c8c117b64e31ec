"""`quantize` composes with `torch.func` (grad, jacrev, vmap, functional_call) and
`torch.compile(fullgraph=True)`."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._dynamo.utils

import vqfunc
from vqfunc import VQConfig


@pytest.mark.parametrize(
    "cfg",
    [
        VQConfig(feature_size=6, num_codes=10, dim=1),
        VQConfig(feature_size=6, num_codes=12, dim=-1, groups=3, share=False),
        VQConfig(feature_size=6, num_codes=10, dim=0, groups=2, affine_lr=2.0),
    ],
    ids=["plain", "separate-groups", "affine"],
)
def test_grad_through_quantize_is_identity_for_the_input(
    cfg: VQConfig, generator: torch.Generator
) -> None:
    params = vqfunc.init_params(cfg, generator=generator)
    shape = [3, 4]
    shape.insert(cfg.dim % 3, cfg.feature_size)
    x = torch.randn(shape, generator=generator)
    w = torch.randn(shape, generator=generator)

    def task(x: torch.Tensor) -> torch.Tensor:
        z_q, _ = vqfunc.quantize(params, x, cfg)
        return (z_q * w).sum()

    assert torch.equal(torch.func.grad(task)(x), w)
    # The full Jacobian of z_q with respect to x is the identity matrix.
    jacobian = torch.func.jacrev(lambda x: vqfunc.quantize(params, x, cfg)[0])(x)
    eye = torch.eye(x.numel()).reshape(*x.shape, *x.shape)
    assert torch.equal(jacobian, eye)


def test_grad_with_respect_to_params_reaches_only_selected_codes(
    generator: torch.Generator,
) -> None:
    cfg = VQConfig(feature_size=4, num_codes=12, dim=-1, beta=0.7)
    params = vqfunc.init_params(cfg, generator=generator)
    x = torch.randn(9, 4, generator=generator)

    def loss(params: vqfunc.VQParams) -> torch.Tensor:
        return vqfunc.quantize(params, x, cfg)[1].loss

    grads = torch.func.grad(loss)(params)
    assert isinstance(grads, vqfunc.VQParams)
    _, out = vqfunc.quantize(params, x, cfg)
    # d/dC_k of beta * mean((x - C_q)^2) over the rows assigned to k.
    expected = torch.zeros_like(params.codebook)
    expected.index_add_(
        0, out.codes, -2.0 * cfg.beta * (x - params.codebook[out.codes]) / x.numel()
    )
    torch.testing.assert_close(grads.codebook, expected)
    used = torch.zeros(cfg.num_codes, dtype=torch.bool)
    used[out.codes] = True
    assert torch.all(grads.codebook[~used] == 0)


@pytest.mark.parametrize("share", [True, False])
def test_vmap_over_param_sets_equals_a_loop(share: bool, generator: torch.Generator) -> None:
    cfg = VQConfig(feature_size=6, num_codes=8, dim=-1, groups=2, share=share, dist="cosine")
    stacks = [vqfunc.init_params(cfg, generator=generator) for _ in range(4)]
    stacked = vqfunc.VQParams(*(torch.stack(leaves) for leaves in zip(*stacks, strict=True)))
    x = torch.randn(5, 7, 6, generator=generator)

    def run(params: vqfunc.VQParams) -> tuple[torch.Tensor, ...]:
        z_q, out = vqfunc.quantize(params, x, cfg)
        return z_q, out.codes, out.loss, out.perplexity

    batched = torch.func.vmap(run)(stacked)
    looped = [run(p) for p in stacks]
    for i, one in enumerate(looped):
        for got, want in zip(batched, one, strict=True):
            torch.testing.assert_close(got[i], want)


def test_vmap_over_inputs_equals_a_loop(generator: torch.Generator) -> None:
    cfg = VQConfig(feature_size=4, num_codes=8, dim=0)
    params = vqfunc.init_params(cfg, generator=generator)
    xs = torch.randn(3, 4, 5, generator=generator)
    batched_z_q, batched_out = torch.func.vmap(lambda x: vqfunc.quantize(params, x, cfg))(xs)
    for i in range(xs.shape[0]):
        z_q, out = vqfunc.quantize(params, xs[i], cfg)
        torch.testing.assert_close(batched_z_q[i], z_q)
        assert torch.equal(batched_out.codes[i], out.codes)


def test_functional_call_on_the_layer_equals_the_pure_call(generator: torch.Generator) -> None:
    layer = vqfunc.VectorQuantize(feature_size=8, num_codes=16, groups=2, dim=1)
    other = vqfunc.init_params(layer.cfg, generator=generator)
    x = torch.randn(2, 8, 3, generator=generator)
    z_q, misc = torch.func.functional_call(layer, other._asdict(), (x,))
    want_z_q, want = vqfunc.quantize(other, x, layer.cfg)
    assert torch.equal(z_q, want_z_q)
    assert torch.equal(misc["codes"], want.codes)
    assert torch.equal(misc["loss"], want.loss)
    # And differentiating through functional_call gives the pure call's gradients.
    g_layer = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,))[1]["loss"])(
        other._asdict()
    )
    g_pure = torch.func.grad(lambda p: vqfunc.quantize(p, x, layer.cfg)[1].loss)(other)
    torch.testing.assert_close(g_layer["codebook"], g_pure.codebook)


# "eager" captures the graph without generating code (about a second on CPU): the quick check
# that quantize traces as one graph and does not recompile. Inductor's code generation takes
# tens of seconds on CPU.
@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_runs_and_does_not_recompile(
    backend: str, generator: torch.Generator
) -> None:
    cfg = VQConfig(feature_size=8, num_codes=32, dim=-1, groups=2, share=False, dist="cosine")
    params = vqfunc.init_params(cfg, generator=generator)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        compiled = torch.compile(vqfunc.quantize, fullgraph=True, backend=backend)
        x1 = torch.randn(16, 8, generator=generator)
        x2 = torch.randn(16, 8, generator=generator)
        z_q1, out1 = compiled(params, x1, cfg)
        with torch._dynamo.config.patch(error_on_recompile=True):
            z_q2, out2 = compiled(params, x2, cfg)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
        for x, z_q, out in ((x1, z_q1, out1), (x2, z_q2, out2)):
            want_z_q, want = vqfunc.quantize(params, x, cfg)
            torch.testing.assert_close(z_q, want_z_q)
            assert torch.equal(out.codes, want.codes)
            torch.testing.assert_close(out.loss, want.loss)
    finally:
        torch._dynamo.reset()
