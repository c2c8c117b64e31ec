"""The layers `vqfunc.nn.FSQ`, `ResidualFSQ`, `LFQ`, `ResidualLFQ`: the pure functions with their
configuration, the configuration's fields as keyword arguments, any rank, masks, `no_vq`."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pytest
import torch

import vqfunc
from vqfunc import fsq, lfq

# (layer, configuration, its required field's value, the functional form)
LAYERS: list[tuple[type, type, dict[str, Any], Any]] = [
    (vqfunc.nn.FSQ, fsq.FSQConfig, {"levels": (8, 5, 5, 5)}, fsq.quantize),
    (vqfunc.nn.ResidualFSQ, fsq.ResidualFSQConfig, {"levels": (8, 5, 5, 5)}, fsq.quantize_residual),
    (vqfunc.nn.LFQ, lfq.LFQConfig, {"bits": 4}, lfq.quantize),
    (vqfunc.nn.ResidualLFQ, lfq.ResidualLFQConfig, {"bits": 4}, lfq.quantize_residual),
]
IDS = [layer.__name__ for layer, *_ in LAYERS]


@pytest.mark.parametrize(("layer", "cfg_type", "required", "function"), LAYERS, ids=IDS)
def test_every_config_field_is_a_layer_argument(
    layer: type, cfg_type: type, required: dict[str, Any], function: Any
) -> None:
    parameters = inspect.signature(layer).parameters
    fields = {f.name: f for f in dataclasses.fields(cfg_type)}
    for name, field in fields.items():
        assert name in parameters, f"{layer.__name__} does not take {name}"
        if field.default is dataclasses.MISSING:
            assert parameters[name].default is inspect.Parameter.empty
        else:
            assert parameters[name].default == field.default
    assert set(parameters) - set(fields) <= {"process_group"}
    assert layer(**required).cfg == cfg_type(**required)
    assert layer(*required.values()).cfg == cfg_type(**required)  # the first field positionally
    with pytest.raises(TypeError, match=f"{layer.__name__}: unexpected keyword argument 'groups'"):
        layer(**required, groups=2)


@pytest.mark.parametrize(("layer", "cfg_type", "required", "function"), LAYERS, ids=IDS)
def test_forward_is_the_functional_call(
    layer: type, cfg_type: type, required: dict[str, Any], function: Any
) -> None:
    module = layer(**required)  # dim=1, as VectorQuantize
    assert list(module.parameters()) == [] and module.state_dict() == {}
    features = module.cfg.feature_size
    x = torch.randn(2, features, 3, 5, generator=torch.Generator().manual_seed(0))
    mask = torch.rand(2, 3, 5, generator=torch.Generator().manual_seed(1)) > 0.3
    for training in (True, False):
        module.train(training)
        z_q, misc = module(x, mask=mask)
        z_ref, out = function(x, module.cfg, mask=mask)
        assert torch.equal(z_q, z_ref) and z_q.shape == x.shape
        for name, value in out._asdict().items():
            assert torch.equal(misc[name], value), name
        assert "codes" in misc and misc["loss"].shape == ()
        if "loss" not in out._fields:
            assert float(misc["loss"]) == 0.0
    assert repr(module).startswith(f"{layer.__name__}(")


@pytest.mark.parametrize(("layer", "cfg_type", "required", "function"), LAYERS, ids=IDS)
@pytest.mark.parametrize("shape", [(-1,), (0, -1), (3, 0, -1), (2, 3, -1)])
def test_any_rank_and_empty_batches(
    layer: type, cfg_type: type, required: dict[str, Any], function: Any, shape: tuple[int, ...]
) -> None:
    module = layer(**required, dim=-1)
    full = (*shape[:-1], module.cfg.feature_size)
    x = torch.randn(full, requires_grad=True)
    z_q, misc = module(x)
    assert z_q.shape == x.shape
    codes_shape = misc["codes"].shape
    assert codes_shape[: len(full) - 1] == full[:-1]
    (z_q.sum() + misc["loss"]).backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize(("layer", "cfg_type", "required", "function"), LAYERS, ids=IDS)
def test_no_vq_makes_an_identity(
    layer: type, cfg_type: type, required: dict[str, Any], function: Any
) -> None:
    model = torch.nn.Sequential(layer(**required, dim=-1))
    x = torch.randn(5, model[0].cfg.feature_size)
    with vqfunc.no_vq(model):
        z_q, misc = model[0](x)
        assert z_q is x and float(misc["loss"]) == 0.0
    with vqfunc.no_vq():
        assert model[0](x)[0] is x
    assert not torch.equal(model[0](x)[0], x)


def test_half_precision_layers_keep_the_dtype() -> None:
    module = vqfunc.nn.FSQ((8, 5, 5, 5), dim=-1)
    x = torch.randn(64, 4).bfloat16()
    z_q, misc = module(x)
    assert z_q.dtype == torch.bfloat16
    assert torch.equal(fsq.dequantize(misc["codes"], module.cfg, dtype=torch.bfloat16), z_q)
    layer = vqfunc.nn.LFQ(6, dim=-1, spherical=True)
    z_q, misc = layer(torch.randn(8, 6).half())
    assert z_q.dtype == torch.float16 and misc["loss"].dtype == torch.float32
