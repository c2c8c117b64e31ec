"""Bad input raises an error that names the argument, the value and what was expected, before
anything is changed."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import vqfunc
from vqfunc import VQConfig, VQParams, dequantize, init_params, quantize, warmup_params
from vqfunc.inits import codebook_warmup

CFG = VQConfig(feature_size=8, num_codes=16)


@pytest.fixture
def params() -> VQParams:
    return init_params(CFG, generator=torch.Generator().manual_seed(0))


def test_wrong_feature_size_suggests_the_likely_dim(params: VQParams) -> None:
    with pytest.raises(ValueError) as info:
        quantize(params, torch.randn(4, 5, 8), CFG)
    message = str(info.value)
    assert "quantize" in message
    assert "5 features on dim=1" in message
    assert "(4, 5, 8)" in message
    assert "feature_size is 8" in message
    assert "did you mean dim=-1?" in message

    with pytest.raises(ValueError, match=re.escape("did you mean dim=0?")):
        quantize(params, torch.randn(8, 4, 5), CFG)
    with pytest.raises(ValueError, match=re.escape("did you mean dim=0 or dim=-1?")):
        quantize(params, torch.randn(8, 5, 8), CFG)
    # No axis of the right size: no suggestion.
    with pytest.raises(ValueError) as info:
        quantize(params, torch.randn(4, 6), CFG)
    assert "6 features" in str(info.value) and "did you mean" not in str(info.value)


def test_dim_out_of_range(params: VQParams) -> None:
    with pytest.raises(IndexError) as info:
        quantize(params, torch.randn(3, 5), CFG.replace(dim=3))
    message = str(info.value)
    assert "cfg.dim=3" in message and "rank 2" in message and "[-2, 1]" in message
    # With an axis of the right size, the message suggests it.
    with pytest.raises(IndexError) as info:
        quantize(params, torch.randn(3, 8), CFG.replace(dim=2))
    message = str(info.value)
    assert "cfg.dim=2 is out of range for x of shape (3, 8)" in message
    assert "did you mean dim=-1?" in message
    # A single [F] vector with vqtorch's default dim=1.
    with pytest.raises(IndexError, match=re.escape("(did you mean dim=-1?)")):
        quantize(params, torch.randn(8), CFG)
    with pytest.raises(IndexError, match=re.escape("use dim=-1 or dim=0")):
        quantize(params, torch.randn(5), CFG)


def test_scalar_input(params: VQParams) -> None:
    with pytest.raises(ValueError, match=r"x is a scalar; expected a tensor of rank >= 1"):
        quantize(params, torch.tensor(1.0), CFG)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_floating_input(params: VQParams, dtype: torch.dtype) -> None:
    x = torch.zeros(4, 8, dtype=dtype)
    with pytest.raises(TypeError) as info:
        quantize(params, x, CFG.replace(dim=-1))
    message = str(info.value)
    assert "x must be a floating tensor" in message
    assert str(dtype) in message
    assert "x.float()" in message


def test_non_tensor_input(params: VQParams) -> None:
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got list"):
        quantize(params, [[0.0] * 8], CFG)


def test_wrong_params(params: VQParams) -> None:
    with pytest.raises(ValueError) as info:
        quantize(params._replace(codebook=torch.randn(16, 4)), torch.randn(3, 8), CFG)
    message = str(info.value)
    assert "params.codebook has shape (16, 4)" in message and "expects (16, 8)" in message
    with pytest.raises(TypeError, match=r"params must be a VQParams .* got tuple"):
        quantize(tuple(params), torch.randn(3, 8), CFG)
    with pytest.raises(TypeError, match=r"params.codebook must be a floating tensor"):
        quantize(params._replace(codebook=params.codebook.long()), torch.randn(3, 8), CFG)
    with pytest.raises(TypeError, match=r"cfg must be a vqfunc.VQConfig .* got dict"):
        quantize(params, torch.randn(3, 8), {"feature_size": 8})  # type: ignore[arg-type]


def test_params_and_input_on_different_devices() -> None:
    # The "meta" device stands in for a second device on a CPU-only machine.
    meta = init_params(CFG, device="meta")
    with pytest.raises(ValueError) as info:
        quantize(meta, torch.randn(3, 8), CFG)
    message = str(info.value)
    assert "x is on cpu" in message and "params.codebook is on meta" in message
    assert "x.to(params.codebook.device)" in message
    with pytest.raises(ValueError, match=r"x is on cpu but params.codebook is on meta"):
        warmup_params(meta, torch.randn(30, 8), CFG.replace(dim=-1))
    mixed = meta._replace(affine_scale=torch.zeros(0, 8))
    with pytest.raises(ValueError, match=r"params.affine_scale is on cpu but params.codebook"):
        quantize(mixed, torch.randn(3, 8), CFG)
    with pytest.raises(ValueError, match=r"codes are on cpu but params.codebook is on meta"):
        dequantize(meta, torch.zeros(3, dtype=torch.long), CFG.replace(dim=-1))


def test_bad_mask(params: VQParams) -> None:
    cfg = CFG.replace(dim=-1)
    with pytest.raises(ValueError) as info:
        quantize(params, torch.randn(3, 5, 8), cfg, mask=torch.ones(3, 4, dtype=torch.bool))
    message = str(info.value)
    assert "mask has shape (3, 4), expected (3, 5)" in message
    with pytest.raises(TypeError, match=r"mask must be a tensor or None, got list"):
        quantize(params, torch.randn(3, 8), cfg, mask=[1, 1, 1])  # type: ignore[arg-type]


def test_bad_codes_for_dequantize(params: VQParams) -> None:
    with pytest.raises(TypeError, match=r"codes must be an integer tensor, got torch.float32"):
        dequantize(params, torch.tensor([1.0, 2.0]), CFG)
    grouped = VQConfig(feature_size=8, num_codes=16, groups=2, dim=-1)
    with pytest.raises(ValueError, match=r"trailing axis of size 2, got shape \(5, 3\)"):
        dequantize(init_params(grouped), torch.zeros(5, 3, dtype=torch.long), grouped)


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"groups": 3}, r"groups=3 must divide feature_size=8 \(divisors of 8: \[1, 2, 4, 8\]\)"),
        ({"dist": "l2"}, r"dist must be one of \('euclidean', 'cosine'\), got 'l2'"),
        ({"feature_size": 0}, "feature_size must be a positive int, got 0"),
        ({"num_codes": 2.5}, "num_codes must be a positive int, got 2.5"),
        ({"dim": 1.0}, r"dim must be an int, got 1.0"),
        ({"beta": 1.5}, r"beta must be in \[0.0, 1.0\], got 1.5"),
        ({"vector_normalize": True}, "needs dist='cosine', got dist='euclidean'"),
        ({"groups": 4, "num_codes": 10, "share": False}, "num_codes=10 .* multiple of groups=4"),
        ({"estimator": "gumbel"}, "estimator must be one of .* got 'gumbel'"),
    ],
)
def test_bad_config(changes: dict[str, object], pattern: str) -> None:
    with pytest.raises((ValueError, TypeError), match=pattern):
        CFG.replace(**changes)
    with pytest.raises((ValueError, TypeError), match=pattern):
        vqfunc.VectorQuantize(**{"feature_size": 8, "num_codes": 16, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("method", ["data", "kmeans"])
def test_warmup_leaves_non_finite_rows_out(params: VQParams, bad: float, method: str) -> None:
    x = torch.randn(40, 8)
    x[7, 3] = bad
    before = params.codebook.clone()
    cfg = CFG.replace(dim=-1)
    got = warmup_params(params, x, cfg, method=method, generator=torch.Generator().manual_seed(0))  # type: ignore[arg-type]
    finite = torch.arange(40) != 7
    want = warmup_params(
        params,
        x[finite],
        cfg,
        method=method,
        generator=torch.Generator().manual_seed(0),  # type: ignore[arg-type]
    )
    assert torch.equal(got.codebook, want.codebook) and got.codebook.isfinite().all()
    assert torch.equal(params.codebook, before)
    with pytest.raises(ValueError, match=r"warmup_params: x holds no vectors .* non-finite"):
        warmup_params(params, torch.full((5, 8), bad), cfg, method=method)  # type: ignore[arg-type]
    assert torch.equal(params.codebook, before)


def test_warmup_bad_arguments(params: VQParams) -> None:
    cfg = CFG.replace(dim=-1)
    with pytest.raises(ValueError, match=r"method must be one of \('data', 'kmeans'\), got 'km'"):
        warmup_params(params, torch.randn(30, 8), cfg, method="km")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"x holds no vectors \(shape \(0, 8\)\)"):
        warmup_params(params, torch.randn(0, 8), cfg)
    with pytest.raises(ValueError, match=r"kmeans_iters must be an int >= 0, got -1"):
        warmup_params(params, torch.randn(30, 8), cfg, kmeans_iters=-1)


def test_init_params_refuses_integer_dtype() -> None:
    with pytest.raises(TypeError, match=r"dtype must be a floating dtype, got torch.int64"):
        init_params(CFG, dtype=torch.int64)


def test_load_params_errors_leave_the_layer_unchanged() -> None:
    layer = vqfunc.VectorQuantize(feature_size=8, num_codes=16)
    before = layer.codebook.detach().clone()
    wrong = init_params(VQConfig(feature_size=4, num_codes=16))
    with pytest.raises(
        ValueError, match=r"params.codebook has shape \(16, 4\), expected \(16, 8\)"
    ):
        layer.load_params(wrong)
    with pytest.raises(TypeError, match=r"params must be a VQParams .* got Tensor"):
        layer.load_params(torch.randn(16, 8))  # type: ignore[arg-type]
    assert torch.equal(layer.codebook, before)


class TwoStage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vq1 = vqfunc.VectorQuantize(feature_size=4, num_codes=8, dim=-1)
        self.proj = nn.Linear(4, 4)
        self.vq2 = vqfunc.VectorQuantize(feature_size=4, num_codes=8, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, _ = self.vq1(x)
        return self.vq2(self.proj(z))[0]


def test_codebook_warmup_bad_arguments() -> None:
    model = TwoStage()
    loader = [torch.randn(16, 4)]
    with pytest.raises(ValueError, match=r"warmup_method must be 'data' or 'kmeans', got 'kmean'"):
        codebook_warmup(model, loader, warmup_method="kmean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"num_batch must be an int >= 1, got 0"):
        codebook_warmup(model, loader, num_batch=0)
    with pytest.raises(ValueError, match=r"max_vectors must be an int >= 1, got 2.5"):
        codebook_warmup(model, loader, max_vectors=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"loader yielded no batch"):
        codebook_warmup(model, [], progress_bar=False)
    with pytest.raises(TypeError, match=r"loader must be re-iterable .* got the one-shot"):
        codebook_warmup(model, iter(loader))
    with pytest.raises(ValueError, match=r"holds no vqfunc.VectorQuantize layer"):
        codebook_warmup(nn.Linear(4, 4), loader)


def test_failed_codebook_warmup_leaves_every_layer_unchanged() -> None:
    model = TwoStage()
    # The first layer warms fine; the projection then turns the second layer's input to NaN.
    with torch.no_grad():
        model.proj.bias.fill_(float("nan"))
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    model.train()
    with pytest.raises(ValueError, match=r"non-finite"):
        codebook_warmup(model, [torch.randn(32, 4)], progress_bar=False)
    after = model.state_dict()
    for name, tensor in before.items():
        assert torch.allclose(after[name], tensor, rtol=0, atol=0, equal_nan=True), name
    assert model.training
