"""`ResidualVectorQuantize`'s codec features: n_levels, quantizer dropout, per-level sizes."""

from __future__ import annotations

import pytest
import torch

import vqfunc
from vqfunc import ResidualVectorQuantize

L = 4


def _layer(**kw: object) -> ResidualVectorQuantize:
    options: dict[str, object] = dict(levels=L, share=False, dim=1)
    options.update(kw)
    return ResidualVectorQuantize(3, 8 * L, generator=torch.Generator().manual_seed(0), **options)


def test_n_levels_is_honoured_in_training_and_in_eval() -> None:
    layer = _layer(replace_freq=1)
    x = torch.randn(5, 3, 7, generator=torch.Generator().manual_seed(1)) + 50.0  # all dead
    before = layer.codebook.detach().clone()
    _, misc = layer(x, n_levels=2)
    assert misc["codes"].shape == (5, 7, 2)
    assert torch.equal(layer.codebook[2:], before[2:])  # the levels that did not run: as they were
    assert not torch.equal(layer.codebook[:2], before[:2])  # the two that ran: replaced
    layer.eval()
    z_q, misc = layer(x, n_levels=3)
    assert misc["codes"].shape == (5, 7, 3)
    ref = vqfunc.residual.dequantize(layer.params, misc["codes"], layer.cfg, n_levels=3)
    torch.testing.assert_close(z_q, ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"n_levels must be None or an int in \[1, 4\].*got 5"):
        layer(x, n_levels=5)


def test_dropout_draws_in_training_only_and_from_the_layer_seed() -> None:
    a = _layer(quantizer_dropout=1.0, dropout_per="batch", dropout_seed=3)
    b = _layer(quantizer_dropout=1.0, dropout_per="batch", dropout_seed=3)
    x = torch.randn(6, 3, 2)
    depth_a = [a(x)[1]["depth"] for _ in range(12)]
    depth_b = [b(x[:2])[1]["depth"] for _ in range(12)]  # another batch size, the same depths
    assert [int(d[0, 0]) for d in depth_a] == [int(d[0, 0]) for d in depth_b]
    assert len({int(d[0, 0]) for d in depth_a}) > 1
    for d in depth_a:
        assert d.shape == (6, 2) and len(torch.unique(d)) == 1
    a.eval()
    assert bool((a(x)[1]["depth"] == L).all())
    # A depth given by the caller is used as is (e.g. pre-drawn for torch.compile).
    z_q, misc = a(x, depth=torch.tensor([1, 2, 3, 4, 1, 2]).view(6, 1))
    ref = vqfunc.residual.dequantize(a.params, misc["codes"][:, :, :1], a.cfg, n_levels=1)
    torch.testing.assert_close(z_q[0], ref[0], rtol=0, atol=1e-6)


def test_per_sample_dropout_in_the_layer() -> None:
    layer = _layer(quantizer_dropout=0.5)
    depths = torch.stack([layer(torch.randn(10, 3, 4))[1]["depth"] for _ in range(30)])
    assert bool((depths[:, 5:] == L).all())  # the last half of the samples: full depth
    assert bool((depths == depths[..., :1]).all())  # one depth per sample
    assert len(torch.unique(depths[:, :5])) == L


def test_per_level_sizes_in_the_layer_and_its_state_dict() -> None:
    layer = ResidualVectorQuantize(3, (8, 4, 2), levels=3, share=False, dim=-1, replace_freq=2)
    assert layer.codebook.shape == (3, 8, 3) and layer.replace_counters.shape == (3, 8)
    _, misc = layer(torch.randn(20, 3))
    assert bool((misc["codes"] < torch.tensor([8, 4, 2])).all())
    fresh = ResidualVectorQuantize(3, (8, 4, 2), levels=3, share=False, dim=-1, replace_freq=2)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.codebook, layer.codebook)
    assert "quantizer_dropout" not in repr(fresh)
    assert "quantizer_dropout=0.5" in repr(_layer(quantizer_dropout=0.5))
