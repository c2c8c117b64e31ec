"""`kmeans_init=True`: the first training batch warms the codebook with k-means, once."""

from __future__ import annotations

import torch

import vqfunc


def _data(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, 4, generator=g) * 5
    return (centres.repeat(10, 1) + 0.1 * torch.randn(80, 4, generator=g)).reshape(2, 40, 4)


def test_first_training_batch_runs_kmeans_once() -> None:
    layer = vqfunc.VectorQuantize(4, 8, dim=-1, kmeans_init=True)
    x = _data()
    initial = vqfunc.VQParams(*(p.detach().clone() for p in layer.params))
    torch.manual_seed(5)
    expected = vqfunc.warmup_params(initial, x, layer.cfg, method="kmeans")
    torch.manual_seed(5)
    layer(x)
    assert bool(layer.kmeans_initialized)
    torch.testing.assert_close(layer.codebook.detach(), expected.codebook)
    warmed = layer.codebook.detach().clone()
    layer(_data(1))
    assert torch.equal(layer.codebook.detach(), warmed)  # not again


def test_eval_mode_does_not_initialise() -> None:
    layer = vqfunc.VectorQuantize(4, 8, dim=-1, kmeans_init=True).eval()
    before = layer.codebook.detach().clone()
    layer(_data())
    assert not bool(layer.kmeans_initialized)
    assert torch.equal(layer.codebook.detach(), before)


def test_masked_rows_are_left_out_of_the_fit() -> None:
    layer = vqfunc.VectorQuantize(4, 8, dim=-1, kmeans_init=True)
    x = _data()
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1] = False
    x_masked = x.clone()
    x_masked[1] = 1e6  # garbage where masked
    initial = vqfunc.VQParams(*(p.detach().clone() for p in layer.params))
    torch.manual_seed(5)
    expected = vqfunc.warmup_params(initial, x[0], layer.cfg, method="kmeans")
    torch.manual_seed(5)
    layer(x_masked, mask=mask)
    torch.testing.assert_close(layer.codebook.detach(), expected.codebook)


def test_ema_statistics_restart_from_the_warmed_codebook() -> None:
    layer = vqfunc.VectorQuantize(4, 8, dim=-1, kmeans_init=True, ema_decay=0.9)
    x = _data()
    torch.manual_seed(0)
    initial = vqfunc.VQParams(*(p.detach().clone() for p in layer.params))
    warmed = vqfunc.warmup_params(initial, x, layer.cfg, method="kmeans")
    state = vqfunc.init_state(warmed, layer.cfg)
    _, out = vqfunc.quantize(warmed, x, layer.cfg)
    expected, _ = vqfunc.update_state(warmed, state, out, layer.cfg)
    torch.manual_seed(0)
    layer(x)
    torch.testing.assert_close(layer.codebook.detach(), expected.codebook)
