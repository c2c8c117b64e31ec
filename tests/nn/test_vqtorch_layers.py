"""`vqfunc.vqtorch.nn`'s layers keep vqtorch's conventions: attributes, `misc`, `state_dict`,
codes, and when the stateful parts run (the numbers are compared with vqtorch's own in
`tests/integration/test_vqtorch_parity.py`)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import vqfunc
import vqfunc.vqtorch as vqtorch
from vqfunc.vqtorch.nn import GroupVectorQuant, ResidualVectorQuant, VectorQuant


def sgd(*args: Any, **kwargs: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(*args, **kwargs, lr=10.0)


# --- attributes ---------------------------------------------------------------------------------


def test_codebook_is_an_embedding_and_attributes_are_vqtorch_s() -> None:
    layer = VectorQuant(32, 256)
    assert isinstance(layer.codebook, nn.Embedding)
    assert layer.codebook.weight.shape == (256, 32)
    assert (layer.feature_size, layer.num_codes, layer.groups, layer.beta) == (32, 256, 1, 0.95)
    assert (layer.dim, layer.nu, layer.affine_lr, layer.topk) == (1, 0.0, 0.0, 1)
    assert layer.enabled is True and layer.code_vector_size == 32
    assert layer.norm == "none" and layer.codebook_norm == "none"
    assert isinstance(layer.norm_layer, nn.Identity) and layer.norm_before_grouping
    assert not hasattr(layer, "affine_transform")
    assert not hasattr(layer, "inplace_codebook_optimizer")
    assert layer.get_codebook_affine_params() is None
    assert torch.equal(layer.get_codebook(), layer.codebook.weight)
    assert vqtorch.is_vq(layer) and isinstance(layer, vqtorch.nn._VQBaseLayer)
    assert layer.extra_repr() == "num_codes: 256\ngroups: 1\nenabled: True"


def test_affine_transform_is_a_submodule_with_vqtorch_parameters() -> None:
    layer = GroupVectorQuant(12, 24, 3, False, affine_lr=2.0, affine_groups=2)
    affine = layer.affine_transform
    assert isinstance(affine, vqtorch.nn.AffineTransform)
    # One affine map for all groups (vqtorch's layout), of the code size.
    assert affine.scale.shape == affine.bias.shape == (2, 4)
    assert affine.lr_scale == 2.0 and affine.num_groups == 2
    scale, bias = layer.get_codebook_affine_params()
    assert scale.shape == bias.shape == (2, 1, 4)
    assert hasattr(layer, "affine_transform")


@pytest.mark.parametrize("cls", [GroupVectorQuant, ResidualVectorQuant])
def test_grouped_and_residual_attributes(cls: type) -> None:
    layer = cls(12, 24, 3, False)
    assert (layer.groups, layer.share, layer.group_size) == (3, False, 8)
    rows = layer.codebook.weight.shape
    assert rows == ((24, 4) if cls is GroupVectorQuant else (24, 12))
    block, offset = layer.get_codebook_by_group(2)
    assert offset == 16 and torch.equal(block, layer.codebook.weight[16:24])
    shared = cls(12, 24, 3, True)
    assert shared.get_codebook_by_group(2)[1] == 0 and shared.group_size == 24


def test_positional_order_of_vqtorch() -> None:
    layer = VectorQuant(8, 16, 0.8, 0.5, 2.0, 2, 5)
    assert (layer.beta, layer.nu, layer.affine_lr) == (0.8, 0.5, 2.0)
    assert layer.affine_transform.num_groups == 2
    assert layer._counts.tolist() == [5.0] * 16
    group = GroupVectorQuant(8, 16, 4, False)
    assert (group.groups, group.share) == (4, False)
    residual = ResidualVectorQuant(8, 16, 3, True)
    assert (residual.groups, residual.share) == (3, True)
    with pytest.raises(TypeError):
        GroupVectorQuant(8, 16, 2, True, 0.9)  # vqtorch takes the rest as keywords


@pytest.mark.parametrize("norm", ["none", None, "l2", "l2c", "bn", "gn", "in"])
@pytest.mark.parametrize("cb_norm", ["none", None, "l2", "l2c"])
def test_every_norm_and_cb_norm_vqtorch_accepts(norm: str | None, cb_norm: str | None) -> None:
    layer = VectorQuant(32, 16, norm=norm, cb_norm=cb_norm)
    z_q, misc = layer(torch.randn(2, 32, 3, 3))
    assert z_q.shape == (2, 32, 3, 3) and misc["q"].shape == (2, 3, 3, 1)


# --- misc ---------------------------------------------------------------------------------------


def test_plain_misc_layout() -> None:
    layer = VectorQuant(8, 16)
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    layer.double()
    z_q, misc = layer(x)
    assert list(misc) == ["z", "z_q", "d", "q", "loss", "perplexity"]
    assert z_q.shape == x.shape and z_q.dtype == x.dtype
    assert misc["z"].shape == misc["z_q"].shape == (2, 3, 5, 1, 8)
    assert misc["q"].shape == misc["d"].shape == (2, 3, 5, 1)  # the trailing axis of size 1
    assert misc["q"].dtype == torch.int64 and misc["d"].dtype == torch.float64
    assert misc["loss"].shape == () and misc["perplexity"].shape == ()
    assert torch.equal(misc["z"], x.movedim(1, -1).unsqueeze(-2))
    assert torch.equal(misc["z_q"], layer.codebook.weight[misc["q"]])


def test_grouped_misc_has_global_codes_with_separate_codebooks() -> None:
    layer = GroupVectorQuant(12, 24, 3, False, dim=-1)
    x = torch.randn(5, 7, 12)
    z_q, misc = layer(x)
    assert list(misc) == ["z", "z_q", "d", "q", "loss", "perplexity"]
    assert misc["z"].shape == misc["z_q"].shape == (5, 7, 3, 4)
    assert misc["q"].shape == misc["d"].shape == (5, 7, 3)
    assert misc["d"].dtype == torch.get_default_dtype()
    for g in range(3):
        assert bool(((misc["q"][..., g] >= 8 * g) & (misc["q"][..., g] < 8 * (g + 1))).all())
    assert torch.equal(misc["z_q"], layer.codebook.weight[misc["q"]])
    assert torch.allclose(z_q, misc["z_q"].flatten(-2))
    # vqfunc's own layer keeps group-local codes for the same codebook.
    native = vqfunc.VectorQuantize(12, 24, groups=3, share=False, dim=-1)
    native.load_params(native.params._replace(codebook=layer.codebook.weight.view(3, 8, 4)))
    _, out = native(x)
    assert torch.equal(out["q"] + torch.arange(3) * 8, misc["q"])


def test_residual_misc_layout() -> None:
    layer = ResidualVectorQuant(8, 32, 3, False, dim=-1)
    x = torch.randn(4, 6, 8)
    z_q, misc = layer(x)
    assert list(misc) == ["z", "z_q", "d", "q", "z_res", "loss", "perplexity"]
    assert misc["z"].shape == misc["z_q"].shape == (4, 6, 1, 8)
    assert misc["q"].shape == misc["d"].shape == (4, 6, 3)
    assert misc["z_res"].shape == (4, 6, 4, 8)
    torch.testing.assert_close(misc["z_res"][..., 0, :], x)
    torch.testing.assert_close(misc["z_res"][..., -1, :], x - misc["z_q"][..., 0, :])
    torch.testing.assert_close(misc["d"], misc["z_res"][..., 1:, :].norm(dim=-1))
    assert torch.equal(misc["q"] // 10, torch.arange(3).expand(4, 6, 3))  # level blocks of 10
    summed = layer.codebook.weight[misc["q"]].sum(-2)
    torch.testing.assert_close(z_q, summed)


def test_disabled_layer_returns_its_normalised_input_and_an_empty_misc() -> None:
    layer = VectorQuant(8, 16, norm="l2")
    layer.enabled = False
    x = torch.randn(2, 8, 3)
    z_q, misc = layer(x)
    assert misc == {}
    torch.testing.assert_close(z_q, torch.nn.functional.normalize(x, dim=1))


# --- state_dict ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "keys"),
    [
        (lambda: VectorQuant(8, 16), ["codebook.weight"]),
        (
            lambda: VectorQuant(8, 16, kmeans_init=True, replace_freq=3, affine_lr=1.0),
            [
                "data_initialized",
                "_counts",
                "codebook.weight",
                "affine_transform.scale",
                "affine_transform.bias",
            ],
        ),
        (
            lambda: GroupVectorQuant(32, 16, 2, False, norm="bn"),
            [
                "norm_layer.weight",
                "norm_layer.bias",
                "norm_layer.running_mean",
                "norm_layer.running_var",
                "norm_layer.num_batches_tracked",
                "codebook.weight",
            ],
        ),
        (
            lambda: ResidualVectorQuant(32, 16, 2, norm="gn"),
            ["norm_layer.weight", "norm_layer.bias", "codebook.weight"],
        ),
    ],
)
def test_state_dict_keys_are_vqtorch_s(make: Any, keys: list[str]) -> None:
    assert list(make().state_dict()) == keys


def test_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    source = GroupVectorQuant(8, 16, 2, False, affine_lr=2.0, replace_freq=3, kmeans_init=True)
    target = GroupVectorQuant(8, 16, 2, False, affine_lr=2.0, replace_freq=3, kmeans_init=True)
    source.train()
    source(torch.randn(4, 8, 3))
    target.load_state_dict(source.state_dict(), strict=True)
    source.eval(), target.eval()
    x = torch.randn(4, 8, 3)
    assert torch.equal(source(x)[0], target(x)[0])


# --- when the stateful parts run ------------------------------------------------------------


def test_replacement_counts_training_forward_passes_only() -> None:
    layer = VectorQuant(4, 64, replace_freq=5)
    x = torch.randn(3, 4)
    layer.eval()
    layer(x)
    assert layer._counts.tolist() == [5.0] * 64
    layer.train()
    with torch.no_grad():  # training mode counts, also without gradients (as in vqtorch)
        _, misc = layer(x.unsqueeze(-1))
    used = torch.zeros(64, dtype=torch.bool)
    used[misc["q"].flatten()] = True
    assert bool((layer._counts[used] == 5).all()) and bool((layer._counts[~used] == 4).all())


def test_replaced_codes_come_from_the_batch() -> None:
    torch.manual_seed(0)
    layer = VectorQuant(4, 64, replace_freq=2, dim=-1)
    x = torch.randn(10, 4)
    layer.train()
    before = layer.codebook.weight.detach().clone()
    layer(x)
    layer(x)  # codes unused twice are replaced by batch vectors plus 1% noise
    changed = (layer.codebook.weight != before).any(-1)
    assert int(changed.sum()) >= 64 - 10
    distance = torch.cdist(layer.codebook.weight[changed].detach(), x).min(-1).values
    assert bool((distance < 0.1 * x.norm(dim=-1).max()).all())
    assert bool((layer._counts == 2).all())


def test_kmeans_warmup_runs_after_the_first_training_pass() -> None:
    torch.manual_seed(0)
    layer = VectorQuant(4, 8, kmeans_init=True, dim=-1)
    x = torch.randn(200, 4)
    before = layer.codebook.weight.detach().clone()
    layer.eval()
    layer(x)
    assert layer.data_initialized.item() == 0
    layer.train()
    _, misc = layer(x)
    # The pass itself used the old codebook; the fitted codes take effect afterwards.
    assert torch.equal(misc["z_q"].squeeze(-2), before[misc["q"].squeeze(-1)])
    assert layer.data_initialized.item() == 1
    fitted = layer.codebook.weight.detach().clone()
    assert not torch.equal(fitted, before)
    layer(x)
    assert torch.equal(layer.codebook.weight, fitted)  # once


def test_inplace_optimizer_keeps_the_codes_found_before_its_step() -> None:
    torch.manual_seed(0)
    layer = VectorQuant(2, 4, beta=1.0, dim=-1, inplace_optimizer=sgd)
    with torch.no_grad():
        layer.codebook.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5, 5]]))
    x = torch.tensor([[0.9, 0.1], [0.8, 0.0], [0.1, 0.7]])
    layer.eval()
    expected = layer(x)[1]["q"]
    layer.train()
    z_q, misc = layer(x)
    assert torch.equal(misc["q"], expected)
    # The step moved the codes; the output is the updated codes of the same assignments.
    assert torch.equal(z_q.detach(), layer.codebook.weight[misc["q"].squeeze(-1)].detach())
    assert not torch.allclose(layer.codebook.weight[1], torch.tensor([1.0, 0.0]))


def test_no_vq_with_vqtorch_calling_convention() -> None:
    model = nn.Sequential(nn.Identity(), VectorQuant(4, 8, dim=-1))
    x = torch.randn(3, 4)
    with vqtorch.no_vq(model):
        assert model[1](x)[1] == {}
    assert model[1].enabled and model[1](x)[1] != {}
    with vqtorch.no_vq([model]):
        assert not model[1].enabled
    assert vqtorch.get_vq_layers(model) == [model[1]]
    assert vqtorch.is_vqn(model) and not vqtorch.is_vqn(nn.Linear(2, 2))


# --- vqtorch's building blocks, as methods ------------------------------------------------------


def test_quantize_compute_loss_and_straight_through_methods() -> None:
    torch.manual_seed(0)
    layer = VectorQuant(8, 16, beta=0.7, sync_nu=0.5, affine_lr=1.0, dim=-1)
    z = torch.randn(3, 5, 8, requires_grad=True)
    z_q, d, q = layer.quantize(layer.codebook.weight, z)
    assert z_q.shape == z.shape and d.shape == q.shape == (3, 5)
    _, misc = layer(z)
    assert torch.equal(q, misc["q"].squeeze(-1))
    torch.testing.assert_close(d, misc["d"].squeeze(-1))
    loss = layer.compute_loss(z, z_q)
    assert loss.shape == (3,)  # vqtorch's per-batch-element loss
    torch.testing.assert_close(loss.mean(), misc["loss"])
    out = layer.straight_through_approximation(z, z_q)
    torch.testing.assert_close(out, z_q)
    out.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))


def test_inputs_of_rank_one_and_two_work() -> None:
    layer = GroupVectorQuant(8, 16, 2, dim=-1)
    assert layer(torch.randn(8))[1]["q"].shape == (2,)
    assert layer(torch.randn(5, 8))[1]["q"].shape == (5, 2)
