"""The fused straight-through output and commitment loss (`vqfunc._kernels.straight_through`)
equal the simple composition of `straight_through`, `synchronized` and `commitment_loss`, in
value and gradient, chunked or not, under `torch.func` transforms and `torch.compile`."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch._dynamo
import torch._dynamo.utils
import torch.nn.functional as F

import vqfunc
from vqfunc import VQConfig
from vqfunc._affine import effective_codebook
from vqfunc._estimators import straight_through, synchronized
from vqfunc._kernels import straight_through as _fused
from vqfunc._layout import from_rows, rows_to_batch, to_rows
from vqfunc._losses import commitment_loss


def _simple(
    z: torch.Tensor,
    codebook: torch.Tensor,
    codes: torch.Tensor,
    beta: float,
    nu: float,
    weights: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    z_q = codebook[codes]
    out = straight_through(z, z_q)
    if nu > 0:
        out = synchronized(out, z_q, nu)
    return out, z_q, commitment_loss(z, z_q, beta, mask=weights)


def _fused_call(
    z: torch.Tensor,
    codebook: torch.Tensor,
    codes: torch.Tensor,
    beta: float,
    nu: float,
    weights: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fused.straight_through_with_loss(z, codebook, codes, beta=beta, nu=nu, weights=weights)


def _case(
    rows: int, generator: torch.Generator, mask: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    d, k = 5, 7
    z = torch.randn(rows, d, generator=generator, dtype=torch.float64)
    codebook = torch.randn(k, d, generator=generator, dtype=torch.float64)
    codes = torch.randint(0, k, (rows,), generator=generator)
    weights: torch.Tensor | None = None
    if mask == "bool":
        weights = torch.rand(rows, generator=generator) > 0.4
    elif mask == "float":
        weights = torch.rand(rows, generator=generator, dtype=torch.float64)
    return z, codebook, codes, weights


def _values_and_grads(fn: Any, z: torch.Tensor, codebook: torch.Tensor, *args: Any) -> Any:
    z = z.detach().requires_grad_(True)
    codebook = codebook.detach().requires_grad_(True)
    out, z_q, loss = fn(z, codebook, *args)
    g_out = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).reshape(out.shape)
    task = (out * g_out).sum() + (z_q * g_out.flip(0).cos()).sum() + 3.0 * loss
    gz, gc = torch.autograd.grad(task, (z, codebook))
    return out, z_q, loss, gz, gc


@pytest.mark.parametrize("mask", ["none", "bool", "float"])
@pytest.mark.parametrize("nu", [0.0, 0.3])
@pytest.mark.parametrize("chunk", [20, 1 << 20])
def test_equals_the_simple_composition(
    mask: str, nu: float, chunk: int, generator: torch.Generator
) -> None:
    z, codebook, codes, weights = _case(13, generator, mask)
    with vqfunc.kernels.use(chunk_elements=chunk):  # 4 rows of 5, or all
        got = _values_and_grads(_fused_call, z, codebook, codes, 0.7, nu, weights)
    want = _values_and_grads(_simple, z, codebook, codes, 0.7, nu, weights)
    assert torch.equal(got[0], want[0])  # the value is exactly the selected codes
    assert torch.equal(got[1], want[1])
    for g, w in zip(got[2:], want[2:], strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("mask", ["none", "bool"])
def test_empty_and_fully_masked_batches(mask: str, generator: torch.Generator) -> None:
    for rows in (0, 3):
        z, codebook, codes, weights = _case(rows, generator, mask)
        if weights is not None:
            weights = torch.zeros_like(weights)
        elif rows > 0:
            continue
        out, _, loss, gz, gc = _values_and_grads(_fused_call, z, codebook, codes, 0.5, 0.2, weights)
        assert out.shape == (rows, 5)
        assert loss.item() == 0.0
        assert gz.shape == z.shape
        want = _values_and_grads(_simple, z, codebook, codes, 0.5, 0.2, weights)
        torch.testing.assert_close(gz, want[3])
        torch.testing.assert_close(gc, want[4])


@pytest.fixture
def chunks_of_few_rows() -> Any:
    # 20 elements a chunk: 4 rows of 5, or 3 to 10 rows of a group's 2 to 6 entries.
    with vqfunc.kernels.use(chunk_elements=20) as settings:
        yield settings


@pytest.mark.usefixtures("chunks_of_few_rows")
def test_func_grad_and_vmap_over_codebooks_equal_a_loop(generator: torch.Generator) -> None:
    z, _, codes, weights = _case(10, generator, "float")
    books = torch.randn(3, 7, 5, generator=generator, dtype=torch.float64)

    def objective(fn: Any) -> Any:
        def f(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
            out, z_q, loss = fn(z, codebook, codes, 0.8, 0.5, weights)
            return (out * z.detach().cos()).sum() + (z_q * z.detach().sin()).sum() + loss

        return f

    grads = torch.func.vmap(torch.func.grad(objective(_fused_call), argnums=(0, 1)), (None, 0))
    got_z, got_c = grads(z, books)
    for i in range(3):
        want_z, want_c = torch.func.grad(objective(_simple), argnums=(0, 1))(z, books[i])
        torch.testing.assert_close(got_z[i], want_z)
        torch.testing.assert_close(got_c[i], want_c)
    # vmap over stacked inputs as well, forward values included.
    zs = torch.randn(3, 10, 5, generator=generator, dtype=torch.float64)
    out, _, loss = torch.func.vmap(lambda z, c: _fused_call(z, c, codes, 0.8, 0.5, weights))(
        zs, books
    )
    for i in range(3):
        want_out, _, want_loss = _simple(zs[i], books[i], codes, 0.8, 0.5, weights)
        assert torch.equal(out[i], want_out)
        torch.testing.assert_close(loss[i], want_loss)


def _reference_quantize(
    params: vqfunc.VQParams, x: torch.Tensor, cfg: VQConfig, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`quantize`'s output, loss and out.codewords from its codes, by the simple composition."""
    _, out = vqfunc.quantize(params, x, cfg)
    rows, layout = to_rows(x, cfg.dim, cfg.groups)
    codebook = effective_codebook(params, cfg)
    if cfg.dist == "cosine":
        rows, codebook = F.normalize(rows, dim=-1), F.normalize(codebook, dim=-1)
    codes = out.codes.reshape(-1, cfg.groups)
    z_q = codebook[codes] if cfg.share else codebook[torch.arange(cfg.groups), codes]
    row_mask = None if mask is None else mask.reshape(-1, 1).expand(codes.shape)
    loss = commitment_loss(rows, z_q, cfg.beta, mask=row_mask)
    z_st = straight_through(rows, z_q)
    if cfg.sync_nu > 0:
        z_st = synchronized(z_st, z_q, cfg.sync_nu)
    return from_rows(z_st, layout), loss, rows_to_batch(z_q, layout)


@pytest.mark.parametrize(
    "cfg",
    [
        VQConfig(feature_size=6, num_codes=10, dim=1, beta=0.6),
        VQConfig(feature_size=6, num_codes=12, dim=-1, groups=3, share=False, sync_nu=0.4),
        VQConfig(feature_size=6, num_codes=10, dim=1, groups=2, dist="cosine", affine_lr=2.0),
        VQConfig(feature_size=6, num_codes=8, dim=-1, groups=2, share=False, dist="cosine"),
    ],
    ids=["plain", "separate-sync", "shared-cosine-affine", "separate-cosine"],
)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.usefixtures("chunks_of_few_rows")
def test_quantize_equals_the_simple_composition(
    cfg: VQConfig, masked: bool, generator: torch.Generator
) -> None:
    params = vqfunc.init_params(cfg, generator=generator, dtype=torch.float64)
    affine = params.affine_scale.shape
    params = params._replace(
        affine_scale=torch.randn(affine, generator=generator, dtype=torch.float64),
        affine_bias=torch.randn(affine, generator=generator, dtype=torch.float64),
    )
    shape = [3, 4, 2]
    shape.insert(cfg.dim % 4, cfg.feature_size)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    batch = x.movedim(cfg.dim, -1).shape[:-1]
    mask = (torch.rand(batch, generator=generator) > 0.3) if masked else None
    g_x = torch.randn(shape, generator=generator, dtype=torch.float64)
    g_q = torch.randn(x.movedim(cfg.dim, -1).shape, generator=generator, dtype=torch.float64)

    def objective(params: vqfunc.VQParams, x: torch.Tensor, fused: bool) -> torch.Tensor:
        if fused:
            z_q, out = vqfunc.quantize(params, x, cfg, mask=mask)
            loss, user_z_q = out.loss, out.codewords
        else:
            z_q, loss, user_z_q = _reference_quantize(params, x, cfg, mask)
        return (z_q * g_x).sum() + 2.0 * loss + (user_z_q * g_q).sum()

    got = torch.func.grad(objective, argnums=(0, 1))(params, x, True)
    want = torch.func.grad(objective, argnums=(0, 1))(params, x, False)
    torch.testing.assert_close(got, want)
    z_q, out = vqfunc.quantize(params, x, cfg, mask=mask)
    want_z_q, want_loss, want_user = _reference_quantize(params, x, cfg, mask)
    assert torch.equal(z_q, want_z_q)
    assert torch.equal(out.codewords, want_user)
    torch.testing.assert_close(out.loss, want_loss)


@pytest.mark.slow
def test_compile_fullgraph_with_backward_does_not_recompile(generator: torch.Generator) -> None:
    cfg = VQConfig(feature_size=8, num_codes=16, dim=-1, groups=2, share=False, sync_nu=0.5)
    params = vqfunc.init_params(cfg, generator=generator)
    mask = torch.tensor([True, False, True, True, False, True])

    def step(params: vqfunc.VQParams, x: torch.Tensor) -> Any:
        z_q, out = vqfunc.quantize(params, x, cfg, mask=mask)
        return (
            torch.func.grad(lambda p: (vqfunc.quantize(p, x, cfg, mask=mask)[0] ** 2).sum())(
                params
            ),
            z_q,
            out.loss,
        )

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        compiled = torch.compile(step, fullgraph=True)
        for i in range(2):
            x = torch.randn(6, 8, generator=generator)
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                got = compiled(params, x)
            want = step(params, x)
            torch.testing.assert_close(got, want)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()
