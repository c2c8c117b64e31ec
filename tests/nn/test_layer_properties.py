"""The read-only attributes every VQ layer offers: views of `layer.cfg`, never stored twice."""

from __future__ import annotations

import pytest
import torch

import vqfunc
from vqfunc.nn import ResidualVectorQuantize, VectorQuantize


def test_vector_quantize_reads_its_config() -> None:
    layer = VectorQuantize(12, 24, groups=3, share=False, dim=-1, beta=0.7)
    assert (layer.feature_size, layer.num_codes, layer.dim, layer.groups, layer.beta) == (
        12,
        24,
        -1,
        3,
        0.7,
    )
    for name in ("feature_size", "num_codes", "dim", "groups", "beta"):
        assert name not in layer.__dict__
        with pytest.raises(AttributeError):
            setattr(layer, name, 1)


def test_residual_layer_groups_are_its_levels() -> None:
    layer = ResidualVectorQuantize(8, 16, 4)
    assert layer.groups == layer.levels == layer.cfg.levels == 4
    assert (layer.feature_size, layer.num_codes, layer.beta) == (8, 16, 0.95)


@pytest.mark.parametrize("share", [True, False])
def test_get_codebook_is_the_effective_codebook(share: bool) -> None:
    layer = VectorQuantize(8, 16, groups=2, share=share, affine_lr=2.0, affine_groups=2)
    with torch.no_grad():
        layer.affine_scale.normal_()
        layer.affine_bias.normal_()
    codebook = layer.get_codebook()
    assert not codebook.requires_grad
    assert codebook.shape == layer.codebook.shape
    torch.testing.assert_close(codebook, vqfunc.effective_codebook(layer.params, layer.cfg))
    assert not torch.allclose(codebook, layer.codebook)
