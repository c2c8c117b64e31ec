"""`ResidualVectorQuantize(channel_groups=G)`: grouped residual VQ in the layer."""

from __future__ import annotations

import inspect

import pytest
import torch

import vqfunc
from vqfunc import ResidualVectorQuantize

G, L = 2, 3


def _layer(seed: int = 0, **kw: object) -> ResidualVectorQuantize:
    options: dict[str, object] = dict(groups=L, share=False, dim=1, channel_groups=G)
    options.update(kw)
    return ResidualVectorQuantize(
        4, 6 * L, generator=torch.Generator().manual_seed(seed), **options
    )


def test_groups_still_counts_levels_and_channel_groups_splits_features() -> None:
    layer = _layer()
    assert layer.groups == layer.levels == L and layer.cfg.channel_groups == G
    assert "channel_groups" in inspect.signature(ResidualVectorQuantize).parameters
    assert layer.codebook.shape == (G, L, 6, 2)
    assert "channel_groups=2" in repr(layer)
    assert "channel_groups" not in repr(_layer(channel_groups=1))


def test_forward_backward_matches_the_functional_quantizer() -> None:
    layer = _layer()
    x = torch.randn(5, 4, 7, generator=torch.Generator().manual_seed(1), requires_grad=True)
    z_q, misc = layer(x)
    assert z_q.shape == x.shape and misc["codes"].shape == (5, 7, G, L)
    ref, out = vqfunc.residual.quantize(layer.params, x, layer.cfg)
    torch.testing.assert_close(z_q, ref)
    assert torch.equal(misc["codes"], out.codes)
    (z_q.square().sum() + misc["loss"]).backward()
    assert x.grad is not None and layer.codebook.grad is not None
    assert bool(layer.codebook.grad.abs().sum() > 0)


def test_training_state_round_trips_through_state_dict() -> None:
    kw: dict[str, object] = dict(ema_decay=0.9, replace_freq=1, kmeans_init=True)
    layer = _layer(**kw)
    x = torch.randn(8, 4, 5, generator=torch.Generator().manual_seed(2))
    before = layer.codebook.detach().clone()
    layer(x)
    layer(x + 20.0)  # far from the codes: replacements
    assert not torch.equal(layer.codebook, before)
    assert layer.ema_counts.shape == (G, L, 6) and layer.replace_counters.shape == (G, L, 6)
    other = _layer(seed=5, **kw)
    other.load_state_dict(layer.state_dict())
    for name, value in layer.state_dict().items():
        assert torch.equal(value, other.state_dict()[name]), name
    params, state = vqfunc.checkpoint.from_layer_state_dict(layer.state_dict(), layer.cfg)
    for got, ref in zip(params, layer.params, strict=True):
        assert torch.equal(got, ref)
    assert torch.equal(state.ema.sums, layer.ema_sums)
    layer.eval()
    other.eval()
    assert torch.equal(layer(x)[0], other(x)[0])
    with pytest.raises(RuntimeError, match="size mismatch"):
        _layer(channel_groups=1).load_state_dict(layer.state_dict())


def test_bad_channel_groups_names_the_argument() -> None:
    with pytest.raises(ValueError, match=r"channel_groups=3 must divide feature_size=4"):
        _layer(channel_groups=3)
