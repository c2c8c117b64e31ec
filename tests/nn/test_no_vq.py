"""`vqfunc.nn._no_vq`: VQ layers become identities inside the block, and come back after it."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import vqfunc


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 6)
        self.vq = vqfunc.VectorQuantize(6, 8, dim=-1, replace_freq=1)
        self.decoder = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_q, misc = self.vq(self.encoder(x))
        return self.decoder(z_q), misc["loss"]


def test_layers_are_identities_inside_and_restored_after() -> None:
    torch.manual_seed(0)
    model = _Model()
    x = torch.randn(5, 4)
    quantized, loss = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with vqfunc.no_vq(model):
        out, loss_off = model(x)
        torch.testing.assert_close(out, model.decoder(model.encoder(x)))
        assert loss_off.item() == 0.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # no state update inside the block
    params = vqfunc.VQParams(*(p.detach().clone() for p in model.vq.params))
    z_q, _ = vqfunc.quantize(params, model.encoder(x), model.vq.cfg)
    again, _ = model(x)  # quantizes again (and, training, updates the state after)
    torch.testing.assert_close(again, model.decoder(z_q))
    assert model.vq.vq_enabled
    assert quantized.shape == again.shape and loss.ndim == 0


def test_restored_after_an_exception_and_nested_blocks() -> None:
    layer = vqfunc.VectorQuantize(6, 8, dim=-1)
    with pytest.raises(RuntimeError), vqfunc.no_vq(layer):
        raise RuntimeError
    assert layer.vq_enabled
    with vqfunc.no_vq(layer):
        with vqfunc.no_vq(layer):
            assert not layer.vq_enabled
        assert not layer.vq_enabled
    assert layer.vq_enabled


def test_without_arguments_every_layer_is_an_identity() -> None:
    layer = vqfunc.VectorQuantize(6, 8, dim=-1)
    x = torch.randn(3, 6)
    with vqfunc.no_vq():
        assert torch.equal(layer(x)[0], x)
    assert not torch.equal(layer(x)[0], x)


def test_non_module_argument_is_refused() -> None:
    not_a_module: Any = 3
    with (
        pytest.raises(TypeError, match=r"expected nn\.Module arguments, got int"),
        vqfunc.no_vq(not_a_module),
    ):
        pass
