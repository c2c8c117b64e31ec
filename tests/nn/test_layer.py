"""The `VectorQuantize` layer shim: vqtorch's documented usage, the params view, and inputs of
any rank, size and dtype."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vqfunc
from vqfunc import VectorQuantize


def test_vqtorch_readme_usage_runs_as_written() -> None:
    # vqtorch's README, with `vqfunc` for `vqtorch`, on CPU.
    from vqfunc import VectorQuantize

    vq = VectorQuantize(feature_size=256, num_codes=512)
    vq = VectorQuantize(feature_size=256, num_codes=512, dist="cosine")
    vq = VectorQuantize(feature_size=256, num_codes=512, dist="cosine", vector_normalize=True)
    vq = VectorQuantize(feature_size=256, num_codes=512, dist="cosine", groups=4)
    vq = VectorQuantize(feature_size=32, num_codes=256)
    z_e = torch.randn(1, 32, 64, 64)
    z_q, misc = vq(z_e)
    assert z_q.shape == torch.Size([1, 32, 64, 64])
    commitment_loss = misc["loss"]
    assert commitment_loss.shape == () and torch.isfinite(commitment_loss)
    assert misc["codes"].shape == (1, 64, 64)

    vq = VectorQuantize(feature_size=256, num_codes=512, dim=2)  # [B, N, F] tokens
    tokens = torch.randn(2, 10, 256)
    z_q, misc = vq(tokens)
    assert z_q.shape == tokens.shape and misc["codes"].shape == (2, 10)

    from vqfunc.inits import codebook_warmup

    model = nn.Sequential(nn.Conv2d(3, 32, 1), VectorQuantize(feature_size=32, num_codes=256))
    train_loader = [(torch.randn(4, 3, 8, 8), torch.zeros(4)) for _ in range(3)]
    before = model[1].codebook.detach().clone()
    codebook_warmup(model, train_loader, warmup_method="data", num_batch=128)
    assert not torch.equal(model[1].codebook.detach(), before)


def test_misc_carries_vqtorchs_keys() -> None:
    vq = VectorQuantize(feature_size=8, num_codes=16, groups=2)
    x = torch.randn(3, 8, 5)
    _, misc = vq(x)
    _, out = vqfunc.quantize(vq.params, x, vq.cfg)
    for key in ("loss", "codes", "distances", "perplexity", "z", "codewords", "histogram"):
        assert torch.equal(misc[key], getattr(out, key)), key
    assert misc["z_q"] is misc["codewords"]  # vqtorch's key
    assert misc["q"] is misc["codes"] and misc["d"] is misc["distances"]
    assert misc["codes"].shape == (3, 5, 2)
    assert 1.0 <= float(misc["perplexity"]) <= 16.0


def test_params_view_is_the_layers_own_tensors() -> None:
    vq = VectorQuantize(feature_size=6, num_codes=10, affine_lr=1.0)
    params = vq.params
    assert isinstance(params, vqfunc.VQParams)
    assert params.codebook is vq.codebook
    assert params.affine_scale is vq.affine_scale and params.affine_bias is vq.affine_bias
    assert params.codebook.shape == vq.cfg.codebook_shape == (10, 6)
    assert {name for name, _ in vq.named_parameters()} == set(vqfunc.VQParams._fields)


def test_load_params_copies_values() -> None:
    vq = VectorQuantize(feature_size=4, num_codes=8, dim=-1)
    new = vqfunc.init_params(vq.cfg, generator=torch.Generator().manual_seed(7))
    vq.load_params(new)
    assert torch.equal(vq.codebook, new.codebook)
    assert vq.codebook is not new.codebook
    new.codebook.add_(1.0)  # the layer holds a copy, not the caller's tensor
    assert not torch.equal(vq.codebook, new.codebook)
    assert isinstance(vq.codebook, nn.Parameter)


def test_layer_equals_the_pure_call_and_functional_call() -> None:
    vq = VectorQuantize(feature_size=4, num_codes=8, dim=-1, dist="cosine")
    x = torch.randn(5, 4)
    for training in (True, False):
        vq.train(training)
        z_q, misc = vq(x)
        want_z_q, want = vqfunc.quantize(vq.params, x, vq.cfg)
        assert torch.equal(z_q, want_z_q) and torch.equal(misc["codes"], want.codes)
        other = vqfunc.init_params(vq.cfg, generator=torch.Generator().manual_seed(1))
        z_q, misc = torch.func.functional_call(vq, other._asdict(), (x,))
        want_z_q, want = vqfunc.quantize(other, x, vq.cfg)
        assert torch.equal(z_q, want_z_q) and torch.equal(misc["loss"], want.loss)


def test_warmed_functional_params_go_back_into_the_layer() -> None:
    vq = VectorQuantize(feature_size=4, num_codes=8, dim=-1)
    x = torch.randn(40, 4)
    warmed = vqfunc.warmup_params(vq.params, x, vq.cfg, generator=torch.Generator())
    vq.load_params(warmed)
    _, misc = vq(x)
    assert torch.equal(misc["codes"], vqfunc.quantize(warmed, x, vq.cfg)[1].codes)


@pytest.mark.parametrize(
    ("shape", "dim", "code_shape"),
    [
        ((7, 6), -1, (7,)),  # a [N, F] matrix
        ((7, 6), 1, (7,)),  # the same with vqtorch's default dim
        ((6,), -1, ()),  # a single [F] vector
        ((6,), 0, ()),
        ((0, 6), -1, (0,)),  # empty batches
        ((0, 6), 1, (0,)),
        ((2, 6, 0), 1, (2, 0)),
        ((0, 6, 3, 3), 1, (0, 3, 3)),
    ],
)
def test_any_rank_and_empty_batches(
    shape: tuple[int, ...], dim: int, code_shape: tuple[int, ...]
) -> None:
    vq = VectorQuantize(feature_size=6, num_codes=5, dim=dim)
    x = torch.randn(shape, requires_grad=True)
    z_q, misc = vq(x)
    assert z_q.shape == x.shape
    assert misc["codes"].shape == code_shape
    assert torch.isfinite(misc["loss"]) and torch.isfinite(misc["perplexity"])
    if x.numel() == 0:
        assert float(misc["loss"].detach()) == 0.0 and float(misc["perplexity"]) == 1.0
        assert float(misc["histogram"].sum()) == 0.0
    (z_q.sum() + misc["loss"]).backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert vq.codebook.grad is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_output_dtype_follows_the_input(dtype: torch.dtype) -> None:
    vq = VectorQuantize(feature_size=4, num_codes=8, dim=-1)
    x = torch.randn(10, 4).to(dtype)
    z_q, misc = vq(x)
    assert z_q.dtype == dtype
    torch.testing.assert_close(z_q.float(), vq.codebook[misc["codes"]].detach().to(dtype).float())


def test_layer_moves_with_module_methods() -> None:
    vq = VectorQuantize(feature_size=4, num_codes=8, dim=-1).double()
    assert vq.params.codebook.dtype == torch.float64
    z_q, _ = vq(torch.randn(3, 4, dtype=torch.float64))
    assert z_q.dtype == torch.float64
    built = VectorQuantize(feature_size=4, num_codes=8, dtype=torch.float64, device="cpu")
    assert built.codebook.dtype == torch.float64


def test_commitment_loss_trains_the_codebook() -> None:
    vq = VectorQuantize(feature_size=4, num_codes=8, dim=-1, beta=1.0)
    x = torch.randn(32, 4)
    losses = []
    for _ in range(5):
        vq.zero_grad()
        _, misc = vq(x)
        misc["loss"].backward()
        with torch.no_grad():
            vq.codebook -= 0.5 * vq.codebook.grad
        losses.append(float(misc["loss"].detach()))
    assert losses[-1] < losses[0]


def test_repr_and_state_dict() -> None:
    vq = VectorQuantize(feature_size=8, num_codes=16, dist="cosine", groups=2, share=False)
    text = repr(vq)
    assert "feature_size=8" in text and "num_codes=16" in text and "groups=2" in text
    assert vq.state_dict()["codebook"].shape == (2, 8, 4)
    again = VectorQuantize(feature_size=8, num_codes=16, dist="cosine", groups=2, share=False)
    again.load_state_dict(vq.state_dict())
    assert torch.equal(again.codebook, vq.codebook)
