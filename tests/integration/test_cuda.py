"""On a CUDA device: every quantizer gives what it gives on CPU, trains, compiles, and warms up
deterministically. All tests here are marked `cuda` and skip without a device; run them with
`python -m vqfunc.bench --gpu-check` (or `pytest -m cuda`)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from support.dynamo import assert_one_graph
from support.reference import brute_force

import vqfunc
import vqfunc.fsq
import vqfunc.lfq
import vqfunc.residual
from vqfunc import VQConfig
from vqfunc._search import nearest_codes

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")

CONFIGS = [
    VQConfig(feature_size=16, num_codes=64, dim=-1),
    VQConfig(feature_size=16, num_codes=64, dim=1, dist="cosine"),
    VQConfig(feature_size=16, num_codes=32, dim=-1, groups=4, share=False, affine_lr=1.0),
]


def _on(device: torch.device, tree: Any) -> Any:
    return type(tree)(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in tree))


@pytest.mark.parametrize("cfg", CONFIGS, ids=["euclidean", "cosine", "groups-affine"])
def test_quantize_on_cuda_equals_cpu(cfg: VQConfig) -> None:
    g = torch.Generator().manual_seed(0)
    params = vqfunc.init_params(cfg, generator=g)
    shape = [64, 8]
    shape.insert(cfg.dim % 3, cfg.feature_size)
    x = torch.randn(shape, generator=g)

    def run(device: torch.device) -> tuple[torch.Tensor, ...]:
        leaf = _on(device, params)
        leaf = type(leaf)(*(t.detach().requires_grad_(True) for t in leaf))
        xx = x.to(device).requires_grad_(True)
        z_q, out = vqfunc.quantize(leaf, xx, cfg)
        (z_q.square().sum() + out.loss).backward()
        return out.codes.cpu(), z_q.detach().cpu(), out.loss.detach().cpu(), xx.grad.cpu()

    cpu, cuda = run(torch.device("cpu")), run(CUDA)
    same = cpu[0] == cuda[0]
    assert same.float().mean() > 0.999  # near ties may split in float32
    torch.testing.assert_close(cuda[2], cpu[2], rtol=1e-4, atol=1e-5)
    if bool(same.all()):
        torch.testing.assert_close(cuda[1], cpu[1])
        torch.testing.assert_close(cuda[3], cpu[3], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", vqfunc.kernels.CUDA_CHOICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_search_on_cuda_is_the_float64_argmin(backend: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    vectors, codebook = torch.randn(3000, 40, generator=g), torch.randn(700, 40, generator=g)
    vectors, codebook = vectors.to(dtype), codebook.to(dtype)
    with vqfunc.kernels.use(cuda=backend):
        codes, _ = nearest_codes(vectors.to(CUDA), codebook.to(CUDA))
    want = brute_force(vectors, codebook).argmin(-1)
    assert (codes.cpu() == want).float().mean() > 0.995


def test_residual_fsq_and_lfq_on_cuda_equal_cpu() -> None:
    g = torch.Generator().manual_seed(2)
    cfg = vqfunc.residual.ResidualConfig(feature_size=8, num_codes=48, levels=3, dim=-1)
    params = vqfunc.residual.init_params(cfg, generator=g)
    x = torch.randn(200, 8, generator=g)
    _, cpu = vqfunc.residual.quantize(params, x, cfg)
    _, cuda = vqfunc.residual.quantize(_on(CUDA, params), x.to(CUDA), cfg)
    assert (cpu.codes == cuda.codes.cpu()).float().mean() > 0.99
    fsq = vqfunc.fsq.FSQConfig(levels=(8, 5, 5, 5), dim=-1)
    y = torch.randn(300, 4, generator=g)
    assert torch.equal(
        vqfunc.fsq.quantize(y, fsq)[1].codes, vqfunc.fsq.quantize(y.to(CUDA), fsq)[1].codes.cpu()
    )
    lfq = vqfunc.lfq.LFQConfig(bits=10, dim=-1)
    z = torch.randn(300, 10, generator=g)
    cpu_l, cuda_l = vqfunc.lfq.quantize(z, lfq)[1], vqfunc.lfq.quantize(z.to(CUDA), lfq)[1]
    assert torch.equal(cpu_l.codes, cuda_l.codes.cpu())
    torch.testing.assert_close(cuda_l.loss.cpu(), cpu_l.loss, rtol=1e-4, atol=1e-5)


def test_kmeans_warmup_on_cuda_is_deterministic_for_a_generator() -> None:
    cfg = VQConfig(feature_size=8, num_codes=64, dim=-1)
    data = torch.randn(4096, 8, generator=torch.Generator().manual_seed(3)).to(CUDA)

    def warm() -> torch.Tensor:
        gen = torch.Generator(device=CUDA).manual_seed(4)
        params = vqfunc.init_params(cfg, generator=torch.Generator().manual_seed(5), device=CUDA)
        warmed = vqfunc.warmup_params(params, data, cfg, method="kmeans", generator=gen)
        return warmed.codebook

    first, second = warm(), warm()
    assert first.device.type == CUDA.type and torch.equal(first, second)
    assert torch.isfinite(first).all()


def test_layer_trains_on_cuda_and_keeps_its_state_there() -> None:
    layer = vqfunc.VectorQuantize(16, 64, dim=-1, replace_freq=2, ema_decay=0.9).to(CUDA)
    encoder = torch.nn.Linear(16, 16).to(CUDA)
    optimizer = torch.optim.SGD([*layer.parameters(), *encoder.parameters()], lr=0.1)
    for step in range(3):
        x = torch.randn(128, 16, device=CUDA, generator=torch.Generator(CUDA).manual_seed(step))
        z_q, misc = layer(encoder(x))
        (z_q.square().mean() + misc["loss"]).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(b.device.type == CUDA.type for b in layer.buffers())
    assert all(torch.isfinite(p).all() for p in layer.parameters())


@pytest.mark.slow
def test_compiled_step_on_cuda_is_one_graph_without_recompiles(dynamo_counters: Any) -> None:
    cfg = VQConfig(feature_size=16, num_codes=64, dim=-1, groups=2, share=False, sync_nu=0.5)
    params = vqfunc.init_params(cfg, generator=torch.Generator().manual_seed(6), device=CUDA)

    def step(params: vqfunc.VQParams, x: torch.Tensor) -> torch.Tensor:
        z_q, out = vqfunc.quantize(params, x, cfg)
        return z_q.square().mean() + out.loss

    compiled = torch.compile(step, fullgraph=True)
    for seed in range(3):
        x = torch.randn(256, 16, device=CUDA, generator=torch.Generator(CUDA).manual_seed(seed))
        torch.testing.assert_close(compiled(params, x), step(params, x), rtol=1e-4, atol=1e-5)
    assert_one_graph(dynamo_counters)
