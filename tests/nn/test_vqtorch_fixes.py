"""Where vqtorch is broken, `vqfunc.vqtorch` does the right thing in a form vqtorch code accepts.

One test per case listed in `vqfunc.vqtorch`'s module docstring.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vqfunc
import vqfunc.vqtorch as vqtorch
from vqfunc.vqtorch.nn import GroupVectorQuant, ResidualVectorQuant, VectorQuant


def sgd(*args: Any, **kwargs: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(*args, **kwargs, lr=1.0, momentum=0.9)


@pytest.mark.parametrize(
    "layer",
    [VectorQuant(8, 16), GroupVectorQuant(8, 16, 2, False), ResidualVectorQuant(8, 16, 2)],
    ids=["plain", "group", "residual"],
)
def test_perplexity_is_a_number_and_the_loss_a_scalar(layer: nn.Module) -> None:
    x = torch.randn(6, 8, 4, requires_grad=True)
    z_q, misc = layer(x)
    perplexity = misc["perplexity"]
    assert isinstance(perplexity, torch.Tensor) and perplexity.shape == ()
    rows = layer.codebook.weight.shape[0]
    counts = torch.bincount(misc["q"].flatten(), minlength=rows).float()
    torch.testing.assert_close(perplexity, vqfunc.perplexity(counts))
    assert 1.0 <= float(perplexity) <= rows
    assert misc["loss"].shape == ()
    assert torch.equal(misc["loss"].mean(), misc["loss"])  # vqtorch code's `.mean()` still works
    (z_q.sum() + misc["loss"]).backward()


def test_cosine_search_works() -> None:
    loss_fn, dist_fn = vqtorch.dists.get_dist_fns("cosine")
    assert dist_fn is vqtorch.dists.cosine_cdist_topk and loss_fn is vqtorch.dists.cosine_distance
    z, codebook = torch.randn(2, 50, 6), torch.randn(20, 6)
    out = dist_fn(z, codebook)
    cosine = F.normalize(z, dim=-1) @ F.normalize(codebook, dim=-1).T
    assert torch.equal(out["q"].squeeze(-1), cosine.argmax(-1))
    torch.testing.assert_close(out["d"].squeeze(-1), 1 - cosine.max(-1).values, atol=1e-6, rtol=0)
    top = dist_fn(z, codebook, 4, 3)
    assert top["q"].shape == top["d"].shape == (2, 50, 3)
    assert torch.equal(top["q"], cosine.topk(3, dim=-1).indices)  # nearest first


def test_a_layer_with_the_cosine_dist_fn_quantizes_by_cosine_similarity() -> None:
    layer = VectorQuant(6, 20, dim=-1)
    layer.loss_fn, layer.dist_fn = vqtorch.dists.get_dist_fns("cosine")
    x = torch.randn(30, 6) * torch.rand(30, 1) * 10
    _, misc = layer(x)
    cosine = F.normalize(x, dim=-1) @ F.normalize(layer.codebook.weight, dim=-1).T
    assert torch.equal(misc["q"].squeeze(-1), cosine.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_work_on_cpu(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    layer = GroupVectorQuant(8, 16, 2, False, affine_lr=1.0)
    x = torch.randn(4, 8, 3).to(dtype)
    z_q, misc = layer(x)
    assert z_q.dtype == dtype and misc["z"].dtype == dtype
    _, reference = layer(x.float())
    assert torch.equal(misc["q"], reference["q"])


def test_half_distances_on_cpu_in_dists() -> None:
    out = vqtorch.dists.euclidean_cdist_topk(
        torch.randn(2, 10, 4).half(), torch.randn(8, 4).half(), half_precision=True
    )
    assert out["d"].dtype == torch.float16 and out["q"].dtype == torch.int64


def test_kmeans_init_runs_on_cpu_and_fits_the_data() -> None:
    torch.manual_seed(0)
    centres = torch.randn(8, 4) * 5
    x = centres.repeat_interleave(50, 0) + 0.1 * torch.randn(400, 4)
    layer = VectorQuant(4, 8, kmeans_init=True, dim=-1)
    layer.train()
    with torch.no_grad():
        layer(x)
    assert layer.data_initialized.item() == 1
    codes = layer.codebook.weight.detach()
    found = torch.cdist(centres, codes).min(-1).values < 0.5
    assert int(found.sum()) >= 6  # k-means may merge two clusters, never land far off
    error = torch.cdist(x, codes).min(-1).values.square().mean()
    assert float(error) < 0.1 * float(x.var(0).sum())


def test_kmeans_init_with_fewer_vectors_keeps_the_codebook_size() -> None:
    layer = VectorQuant(4, 10, kmeans_init=True, dim=-1)  # vqtorch leaves 6 rows here
    layer.train()
    x = torch.randn(3, 4)
    with pytest.warns(UserWarning, match="more codes than"), torch.no_grad():
        layer(x)
    weight = layer.codebook.weight
    assert weight.shape == (10, 4)
    assert bool((torch.cdist(weight.detach(), x).min(-1).values < 0.02).all())


def test_kmeans_init_warms_subclasses() -> None:
    class MyQuant(GroupVectorQuant):
        pass

    layer = MyQuant(4, 4, 2, False, kmeans_init=True, dim=-1)
    before = layer.codebook.weight.detach().clone()
    with torch.no_grad():
        layer.train()(torch.randn(50, 4))
    assert layer.data_initialized.item() == 1 and not torch.equal(before, layer.codebook.weight)


@pytest.mark.parametrize("cls", [VectorQuant, GroupVectorQuant, ResidualVectorQuant])
def test_inplace_optimizer_with_affine_back_propagates(cls: type) -> None:
    torch.manual_seed(0)
    layer = cls(8, 16, beta=1.0, affine_lr=2.0, inplace_optimizer=sgd)
    x = torch.randn(4, 8, 3, requires_grad=True)
    layer.train()
    before = layer.codebook.weight.detach().clone()
    z_q, misc = layer(x)
    (z_q.square().sum() + misc["loss"]).backward()  # vqtorch: backward through a freed graph
    assert not torch.equal(before, layer.codebook.weight)
    assert x.grad is not None and layer.affine_transform.scale.grad is not None
    # The output is the affine image of the updated codes.
    codes = misc["q"]
    expected = layer.get_codebook()[codes]
    torch.testing.assert_close(misc["z_q"].detach(), expected)


def test_inplace_step_touches_no_other_gradient_and_keeps_the_task_s() -> None:
    torch.manual_seed(0)
    layer = VectorQuant(8, 16, beta=1.0, affine_lr=2.0, inplace_optimizer=sgd)
    layer.train()
    x = torch.randn(4, 8, 3)
    layer.codebook.weight.grad = torch.ones_like(layer.codebook.weight)
    layer(x)
    assert torch.equal(layer.codebook.weight.grad, torch.ones_like(layer.codebook.weight))
    assert layer.affine_transform.scale.grad is None


def test_inplace_optimizer_in_training_mode_under_no_grad() -> None:
    layer = VectorQuant(8, 16, beta=1.0, inplace_optimizer=sgd)
    before = layer.codebook.weight.detach().clone()
    with torch.no_grad():
        layer.train()(torch.randn(4, 8, 3))  # vqtorch: backward() on a tensor without grad
    assert not torch.equal(before, layer.codebook.weight)


@pytest.mark.parametrize("cls", [GroupVectorQuant, ResidualVectorQuant])
def test_inplace_optimizer_of_grouped_and_residual_layers_steps_their_codebook(cls: type) -> None:
    layer = cls(8, 16, 2, False, beta=1.0, inplace_optimizer=sgd)
    (group,) = layer.inplace_codebook_optimizer.param_groups
    assert group["params"] == [layer.codebook.weight]
    before = layer.codebook.weight.detach().clone()
    layer.train()(torch.randn(4, 8, 3))
    assert not torch.equal(before, layer.codebook.weight)


def test_inplace_optimizer_needs_beta_one_as_in_vqtorch() -> None:
    with pytest.raises(ValueError, match=r"beta=1\.0, got beta=0\.95"):
        VectorQuant(8, 16, inplace_optimizer=sgd)


def test_residual_separate_codebooks_need_no_divisible_feature_size() -> None:
    layer = ResidualVectorQuant(10, 12, 3, False, dim=-1)  # vqtorch: "must be divisible"
    assert layer(torch.randn(5, 10))[1]["q"].shape == (5, 3)


def test_get_codebook_applies_affine_blocks_per_group() -> None:
    layer = GroupVectorQuant(4, 8, 2, False, affine_lr=1.0, affine_groups=2, dim=-1)
    with torch.no_grad():
        layer.affine_transform.scale.copy_(torch.tensor([[1.0, 1.0], [3.0, 3.0]]))
    x = torch.randn(20, 4)
    _, misc = layer(x)
    torch.testing.assert_close(misc["z_q"], layer.get_codebook()[misc["q"]])
    weight = layer.codebook.weight.detach()
    # Within each group's 4 rows, the first 2 are scaled by 2, the next 2 by 4.
    factor = torch.tensor([2.0, 2.0, 4.0, 4.0, 2.0, 2.0, 4.0, 4.0]).unsqueeze(-1)
    torch.testing.assert_close(layer.get_codebook(), weight * factor)


def test_kmeans_step_with_affine_back_propagates_through_the_codes_it_used() -> None:
    torch.manual_seed(0)
    layer = GroupVectorQuant(4, 8, 2, False, kmeans_init=True, affine_lr=1.0, dim=-1)
    x = torch.randn(40, 4)
    reference = GroupVectorQuant(4, 8, 2, False, affine_lr=1.0, dim=-1)
    reference.load_state_dict(
        {k: v for k, v in layer.state_dict().items() if k != "data_initialized"}
    )
    for module in (layer, reference):
        z_q, misc = module.train()(x)
        (z_q.square().sum() + misc["loss"]).backward()
    torch.testing.assert_close(
        layer.affine_transform.scale.grad, reference.affine_transform.scale.grad
    )
    assert not torch.equal(layer.codebook.weight, reference.codebook.weight)  # warmed up


def test_disabled_layers_skip_their_hooks_in_training() -> None:
    layer = VectorQuant(4, 8, kmeans_init=True, replace_freq=2, dim=-1)
    layer.train()
    with vqtorch.no_vq(layer):
        layer(torch.randn(5, 4))  # vqtorch: KeyError 'z' in the k-means hook
    assert layer.data_initialized.item() == 0 and bool((layer._counts == 2).all())


def test_no_vq_without_arguments_switches_every_layer_off() -> None:
    compat, native = VectorQuant(4, 8, dim=-1), vqfunc.VectorQuantize(4, 8, dim=-1)
    x = torch.randn(3, 4)
    with vqtorch.no_vq():
        assert compat(x)[1] == {}
        assert torch.equal(native(x)[0], x)
    assert compat(x)[1] != {} and not torch.equal(native(x)[0], x)


def test_no_vq_restores_each_layer_s_setting() -> None:
    on, off = VectorQuant(4, 8), VectorQuant(4, 8)
    off.enabled = False
    model = nn.ModuleList([on, off])
    with pytest.raises(RuntimeError), vqtorch.no_vq(model):
        assert not on.enabled
        raise RuntimeError
    assert on.enabled is True and off.enabled is False  # vqtorch sets both to True


def test_no_vq_refuses_what_is_no_module() -> None:
    with pytest.raises(TypeError, match=r"nn\.Module"):
        vqtorch.no_vq([nn.Linear(1, 1), "model"])


def test_requires_grad_and_set_requires_grad_work() -> None:
    layer = GroupVectorQuant(4, 8, 2)
    assert layer.requires_grad
    layer.set_requires_grad(False)
    assert not layer.requires_grad and not layer.codebook.weight.requires_grad


def test_replacement_without_noise_and_with_a_period_of_one() -> None:
    layer = vqtorch.nn.utils.lru_replacement(VectorQuant(4, 16, dim=-1), rho=0.0, timeout=1)
    x = torch.randn(3, 4)
    layer.train()(x)
    weight = layer.codebook.weight.detach()
    rows = torch.cdist(weight, x).min(-1).values
    assert int((rows == 0).sum()) >= 13  # exact batch vectors: every unused code replaced
    hook = vqtorch.nn.utils.ReplaceLRU.apply(VectorQuant(4, 8), timeout=3)
    assert hook.rho == 0.0


def test_unknown_norms_are_named() -> None:
    with pytest.raises(ValueError, match="unknown cb_norm 'L2'"):
        VectorQuant(8, 16, cb_norm="L2")
    with pytest.raises(ValueError, match="unknown norm 'batch'"):
        VectorQuant(8, 16, norm="batch")


def test_errors_name_the_argument_and_the_value() -> None:
    layer = VectorQuant(8, 16)
    with pytest.raises(ValueError, match=r"7 features on dim=1.*feature_size is 8"):
        layer(torch.randn(2, 7, 3))
    with pytest.raises(ValueError, match=r"did you mean dim=-1"):
        layer(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\], got 1.5"):
        VectorQuant(8, 16, beta=1.5)
    with pytest.raises(ValueError, match=r"feature_size=10 must be divisible by groups=4"):
        GroupVectorQuant(10, 16, 4)
    with pytest.raises(ValueError, match=r"timeout must be an int >= 1, got 0"):
        vqtorch.nn.utils.ReplaceLRU(timeout=0)


def test_pooling_layers_are_in_nn_as_the_readme_says() -> None:
    assert vqtorch.nn.MaxVecPool2d is vqtorch.nn.pool.MaxVecPool2d
    assert vqtorch.nn.SoftMaxVecPool2d is vqtorch.nn.pool.SoftMaxVecPool2d


def test_entropy_keeps_the_axes_in_order() -> None:
    x = torch.rand(2, 3, 4, 5)
    for dim in range(-4, 4):
        p = (x + 1e-8) / (x + 1e-8).sum(dim, keepdim=True)
        expected = -(p * p.log()).sum(dim)
        torch.testing.assert_close(vqtorch.entropy(x, dim=dim), expected)
        assert vqtorch.entropy(x, dim=dim, keepdim=True).shape == expected.unsqueeze(dim).shape
    with pytest.raises(ValueError, match="non-negative"):
        vqtorch.entropy(torch.tensor([1.0, -1.0]))
    assert vqtorch.entropy(torch.ones(4)).shape == ()


def test_no_warning_is_left_behind() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer = VectorQuant(4, 8, dim=-1)
        layer(torch.randn(50, 4))


def test_vector_pooling_with_a_dilation() -> None:
    x = torch.randn(2, 3, 9, 9)
    pooled = vqtorch.nn.MaxVecPool2d(kernel_size=3, stride=2, padding=2, dilation=2)(x)
    windows = F.unfold(x, 3, dilation=2, padding=2, stride=2).view(2, 3, 9, -1)
    pick = windows.norm(dim=1).argmax(1)  # [2, L]
    expected = windows.gather(2, pick[:, None, None].expand(2, 3, 1, -1)).squeeze(2)
    assert torch.equal(pooled.flatten(2), expected)


def test_running_statistics_affine_in_a_grouped_layer() -> None:
    layer = GroupVectorQuant(8, 16, 2, False, affine_lr=1.0, dim=-1)
    layer.affine_transform = vqtorch.nn.AffineTransform(4, use_running_statistics=True)
    x = torch.randn(40, 8) * 3 + 1
    layer.train()
    _, misc = layer(x)
    assert layer.affine_transform.running_statistics_initialized.item() == 1
    assert misc["q"].shape == (40, 2)
    residual = ResidualVectorQuant(8, 16, 2, affine_lr=1.0, dim=-1)
    residual.affine_transform = vqtorch.nn.AffineTransform(8, use_running_statistics=True)
    with pytest.raises(NotImplementedError, match="running statistics"):
        residual(x)
