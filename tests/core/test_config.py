"""`VQConfig`: a frozen, keyword-only, hashable and validated description of a quantizer."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import vqfunc
from vqfunc import VQConfig


def test_defaults_follow_vqtorch() -> None:
    cfg = VQConfig(feature_size=16, num_codes=32)
    assert cfg.dim == 1
    assert cfg.dist == "euclidean"
    assert cfg.vector_normalize is False
    assert cfg.groups == 1 and cfg.share is True
    assert cfg.beta == 0.95
    assert cfg.affine_lr == 0 and cfg.sync_nu == 0 and cfg.replace_freq == 0


def test_frozen_keyword_only_and_hashable() -> None:
    cfg = VQConfig(feature_size=16, num_codes=32, dist="cosine")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_codes = 8  # type: ignore[misc]
    with pytest.raises(TypeError):
        VQConfig(16, 32)  # type: ignore[misc]
    same = VQConfig(feature_size=16, num_codes=32, dist="cosine")
    assert cfg == same and hash(cfg) == hash(same)
    assert cfg != VQConfig(feature_size=16, num_codes=32)
    assert len({cfg, same}) == 1


@pytest.mark.parametrize(
    ("kwargs", "code_dim", "num_books", "codes_per_book", "shape"),
    [
        ({}, 12, 1, 24, (24, 12)),
        ({"groups": 3}, 4, 1, 24, (24, 4)),
        ({"groups": 3, "share": False}, 4, 3, 8, (3, 8, 4)),
        ({"groups": 12, "share": False}, 1, 12, 2, (12, 2, 1)),
    ],
)
def test_derived_sizes(
    kwargs: dict[str, object],
    code_dim: int,
    num_books: int,
    codes_per_book: int,
    shape: tuple[int, ...],
) -> None:
    cfg = VQConfig(feature_size=12, num_codes=24, **kwargs)  # type: ignore[arg-type]
    assert cfg.code_dim == code_dim
    assert cfg.num_books == num_books
    assert cfg.codes_per_book == codes_per_book
    assert cfg.codebook_shape == shape


def test_replace_validates_again() -> None:
    cfg = VQConfig(feature_size=12, num_codes=24)
    assert cfg.replace(dim=-1).dim == -1
    assert cfg.replace(dim=-1).num_codes == 24
    assert cfg.dim == 1  # unchanged
    with pytest.raises(ValueError, match="groups=5 must divide feature_size=12"):
        cfg.replace(groups=5)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"feature_size": -3}, "feature_size must be a positive int, got -3"),
        ({"num_codes": 0}, "num_codes must be a positive int, got 0"),
        ({"num_codes": True}, "num_codes must be a positive int, got True"),
        ({"groups": 0}, "groups must be a positive int, got 0"),
        ({"dim": "1"}, "dim must be an int, got '1'"),
        ({"dist": "cos"}, "dist must be one of .*got 'cos'"),
        ({"beta": -0.1}, r"beta must be in \[0.0, 1.0\], got -0.1"),
        ({"ema_decay": 1.0}, r"ema_decay must be in \[0.0, 1.0\), got 1.0"),
        ({"affine_lr": -1.0}, "affine_lr must be a finite number >= 0, got -1.0"),
        ({"sync_nu": float("nan")}, "sync_nu must be a finite number >= 0, got nan"),
        ({"replace_freq": -2}, "replace_freq must be an int >= 0.*got -2"),
        ({"affine_groups": 5}, "affine_groups=5 must divide the 24 codes"),
        ({"replace_rho": float("inf")}, "replace_rho must be a finite number >= 0, got inf"),
        ({"ema_eps": float("inf")}, "ema_eps must be a finite number >= 0, got inf"),
        ({"ema_eps": -1e-5}, "ema_eps must be a finite number >= 0, got -1e-05"),
        ({"share": "no"}, "share must be True or False, got 'no'"),
        ({"vector_normalize": 1, "dist": "cosine"}, "vector_normalize must be True or False"),
        ({"kmeans_init": "yes"}, "kmeans_init must be True or False, got 'yes'"),
    ],
)
def test_bad_values_are_named(kwargs: dict[str, object], pattern: str) -> None:
    with pytest.raises((TypeError, ValueError), match=pattern) as info:
        VQConfig(**{"feature_size": 12, "num_codes": 24, **kwargs})  # type: ignore[arg-type]
    assert str(info.value).startswith("VQConfig: ")


@pytest.mark.parametrize(
    ("kwargs", "codebook", "affine"),
    [
        ({}, (24, 12), (0, 12)),
        ({"affine_lr": 1.0}, (24, 12), (1, 12)),
        ({"groups": 3, "share": False, "affine_lr": 1.0, "affine_groups": 2}, (3, 8, 4), (3, 2, 4)),
    ],
)
def test_init_params_shapes(
    kwargs: dict[str, object], codebook: tuple[int, ...], affine: tuple[int, ...]
) -> None:
    cfg = VQConfig(feature_size=12, num_codes=24, **kwargs)  # type: ignore[arg-type]
    params = vqfunc.init_params(cfg, dtype=torch.float64)
    assert params.codebook.shape == codebook
    assert params.affine_scale.shape == params.affine_bias.shape == affine
    assert all(t.dtype == torch.float64 for t in params)
    # Raw affine parameters start at 0, so a fresh layer is not transformed.
    assert not params.affine_scale.any() and not params.affine_bias.any()
    assert params.affine_scale is not params.affine_bias


def test_init_params_same_seed_same_codebook() -> None:
    cfg = VQConfig(feature_size=4, num_codes=8)

    def draw(seed: int, **kwargs: object) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return vqfunc.init_params(cfg, generator=gen, **kwargs).codebook  # type: ignore[arg-type]

    assert torch.equal(draw(3), draw(3))
    assert torch.equal(draw(3), draw(3, device="cpu"))
    assert not torch.equal(draw(3), draw(4))
    assert vqfunc.init_params(cfg, generator=torch.Generator(), device="meta").codebook.is_meta


@pytest.mark.cuda
def test_init_params_cpu_generator_seeds_a_cuda_codebook() -> None:
    cfg = VQConfig(feature_size=4, num_codes=8)
    cpu = vqfunc.init_params(cfg, generator=torch.Generator().manual_seed(0))
    cuda = vqfunc.init_params(cfg, generator=torch.Generator().manual_seed(0), device="cuda")
    assert cuda.codebook.is_cuda and cuda.affine_scale.is_cuda
    assert torch.equal(cuda.codebook.cpu(), cpu.codebook)
