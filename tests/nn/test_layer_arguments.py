"""Every default lives in one place: a layer's arguments are its configuration's fields.

The layers declare no field of their own: their signatures list every field of `VQConfig` /
`ResidualConfig` with the configuration's default, and a layer built with no option has the
configuration built with none.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import vqfunc
from vqfunc.residual import ResidualConfig

LAYERS = [
    (vqfunc.VectorQuantize, vqfunc.VQConfig),
    (vqfunc.ResidualVectorQuantize, ResidualConfig),
]
# The layers' own arguments: what builds the tensors, not what configures the quantizer.
LAYER_ONLY = {
    "generator",
    "device",
    "dtype",
    "process_group",
    "inplace_optimizer",
    "dropout_seed",
}
# vqtorch's name of a field, taken positionally by the residual layer: alias -> field.
ALIASES = {"groups": "levels"}


def _fields(cfg_type: type) -> dict[str, dataclasses.Field[object]]:
    return {f.name: f for f in dataclasses.fields(cfg_type)}


@pytest.mark.parametrize(("layer", "cfg_type"), LAYERS, ids=lambda t: t.__name__)
def test_every_config_field_is_a_layer_argument_with_the_same_default(
    layer: type, cfg_type: type
) -> None:
    parameters = inspect.signature(layer).parameters
    for name, field in _fields(cfg_type).items():
        assert name in parameters, f"{layer.__name__} does not take {cfg_type.__name__}.{name}"
        default = parameters[name].default
        if field.default is dataclasses.MISSING:
            assert default is inspect.Parameter.empty, (layer.__name__, name)
        else:
            assert default == field.default, (layer.__name__, name, default, field.default)
    extra = set(parameters) - set(_fields(cfg_type)) - LAYER_ONLY
    for alias in extra & set(ALIASES):
        assert parameters[alias].default == _fields(cfg_type)[ALIASES[alias]].default
    extra -= set(ALIASES)
    assert not extra, f"{layer.__name__} takes arguments that are no config field: {extra}"


@pytest.mark.parametrize(("layer", "cfg_type"), LAYERS, ids=lambda t: t.__name__)
def test_a_layer_without_options_has_the_default_config(layer: type, cfg_type: type) -> None:
    assert layer(8, 16).cfg == cfg_type(feature_size=8, num_codes=16)


def test_each_shared_field_is_declared_once_in_the_base() -> None:
    base = set(_fields(vqfunc.QuantizerConfig))
    for cfg_type in (vqfunc.VQConfig, ResidualConfig):
        own = {
            name for name in vars(cfg_type).get("__annotations__", {}) if name in _fields(cfg_type)
        }
        assert not own & base, f"{cfg_type.__name__} declares {own & base} again"
    # A changed default in the base reaches both configurations and all layers.
    for cfg_type in (vqfunc.VQConfig, ResidualConfig):
        assert _fields(cfg_type)["beta"].default == _fields(vqfunc.QuantizerConfig)["beta"].default


def test_every_field_reaches_the_layer_config() -> None:
    layer = vqfunc.VectorQuantize(
        8, 16, dim=-1, dist="cosine", vector_normalize=True, groups=2, share=False, beta=0.5,
        affine_lr=1.0, affine_groups=2, sync_nu=0.1, estimator="rotation", replace_freq=3,
        replace_rho=0.2, kmeans_init=True,
    )  # fmt: skip
    assert layer.cfg == vqfunc.VQConfig(
        feature_size=8, num_codes=16, dim=-1, dist="cosine", vector_normalize=True, groups=2,
        share=False, beta=0.5, affine_lr=1.0, affine_groups=2, sync_nu=0.1,
        estimator="rotation", replace_freq=3, replace_rho=0.2, kmeans_init=True,
    )  # fmt: skip
    residual = vqfunc.ResidualVectorQuantize(4, 6, 3, False, beta=0.3, kmeans_init=True)
    assert residual.cfg == ResidualConfig(
        feature_size=4, num_codes=6, levels=3, share=False, beta=0.3, kmeans_init=True
    )
    assert vqfunc.ResidualVectorQuantize(4, 6, levels=3).cfg.levels == 3


def test_unknown_argument_names_the_layer_and_the_fields() -> None:
    with pytest.raises(TypeError, match=r"VectorQuantize: unexpected keyword argument 'norm'"):
        vqfunc.VectorQuantize(8, 16, norm=None)
    with pytest.raises(
        TypeError, match=r"ResidualVectorQuantize: .*'vector_normalize'.*ResidualConfig"
    ):
        vqfunc.ResidualVectorQuantize(8, 16, vector_normalize=True)
    with pytest.raises(ValueError, match=r"^ResidualConfig: dist='cosine' needs codebook_dim"):
        vqfunc.ResidualVectorQuantize(8, 16, dist="cosine")


def test_bad_values_are_refused_by_the_owner_of_the_field() -> None:
    with pytest.raises(ValueError, match=r"^VQConfig: beta must be in \[0.0, 1.0\], got 2"):
        vqfunc.VectorQuantize(8, 16, beta=2)
    with pytest.raises(ValueError, match=r"^ResidualConfig: beta must be in \[0.0, 1.0\]"):
        vqfunc.ResidualVectorQuantize(8, 16, beta=2)
    with pytest.raises(ValueError, match=r"^ResidualConfig: levels must be a positive int"):
        vqfunc.residual.ResidualConfig(feature_size=8, num_codes=16, levels=0)
    with pytest.raises(TypeError, match=r"^VQConfig: share must be True or False, got 'no'"):
        vqfunc.VQConfig(feature_size=8, num_codes=16, share="no")  # type: ignore[arg-type]
    # Nothing half-built: the layer raised before registering a tensor.
    with pytest.raises(ValueError):
        vqfunc.VectorQuantize(8, 16, groups=3)


def test_layout_is_the_one_record_of_codebook_shapes() -> None:
    cfg = vqfunc.VQConfig(feature_size=8, num_codes=12, groups=4, share=False, affine_lr=1.0)
    layout = cfg.layout
    assert layout == vqfunc.CodebookLayout(
        parts=4, share=False, num_codes=12, code_dim=2, affine_groups=1, affine=True
    )
    assert layout.codebook_shape == cfg.codebook_shape == (4, 3, 2)
    assert layout.affine_shape == (4, 1, 2)
    params = vqfunc.init_params(cfg)
    assert params.codebook.shape == layout.codebook_shape
    assert params.affine_scale.shape == layout.affine_shape
    rcfg = ResidualConfig(feature_size=8, num_codes=12, levels=3, share=False)
    assert rcfg.layout.codebook_shape == (3, 4, 8)
    rparams = vqfunc.residual.init_params(rcfg, generator=torch.Generator().manual_seed(0))
    assert rparams.codebook.shape == rcfg.layout.codebook_shape
