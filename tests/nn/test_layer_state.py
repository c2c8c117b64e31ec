"""The layer shim's state: buffers, training-mode updates, purity, state_dict round trips."""

from __future__ import annotations

import optree
import torch

import vqfunc

_TRAINING = {"replace_freq": 2, "ema_decay": 0.9, "kmeans_init": True, "affine_lr": 1.0}


def _batches(count: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 6, 5, generator=g) for _ in range(count)]


def _train(layer: vqfunc.VectorQuantize, batches: list[torch.Tensor], seed: int) -> list:
    """A few training steps (random draws from the global generator, seeded)."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    outputs = []
    for x in batches:
        x = x.clone().requires_grad_(True)
        z_q, misc = layer(x)
        (z_q.square().mean() + misc["loss"]).backward()
        opt.step()
        opt.zero_grad()
        outputs.append(z_q.detach())
    return outputs


def test_state_buffers_are_named_like_the_record_and_persistent() -> None:
    layer = vqfunc.VectorQuantize(6, 8, **_TRAINING)
    keys = set(layer.state_dict())
    names = {"ema_counts", "ema_sums", "replace_counters"}  # `<technique>_<field>`
    assert names <= keys
    assert "kmeans_initialized" in keys
    assert layer.state.ema.counts is layer.ema_counts
    assert layer.state.ema.sums is layer.ema_sums
    assert layer.state.replace.counters is layer.replace_counters
    expected = vqfunc.init_state(vqfunc.VQParams(*(p.detach() for p in layer.params)), layer.cfg)
    leaves = zip(optree.tree_leaves(layer.state), optree.tree_leaves(expected), strict=True)
    for a, b in leaves:
        torch.testing.assert_close(a, b)


def test_state_dict_round_trip_continues_training_identically() -> None:
    batches = _batches(6)
    trained = vqfunc.VectorQuantize(6, 8, generator=torch.Generator().manual_seed(0), **_TRAINING)
    _train(trained, batches[:3], seed=10)
    assert bool(trained.kmeans_initialized)
    fresh = vqfunc.VectorQuantize(6, 8, generator=torch.Generator().manual_seed(99), **_TRAINING)
    fresh.load_state_dict(trained.state_dict())
    out_a = _train(trained, batches[3:], seed=11)
    out_b = _train(fresh, batches[3:], seed=11)
    for a, b in zip(out_a, out_b, strict=True):
        assert torch.equal(a, b)
    for (name, a), (_, b) in zip(
        trained.state_dict().items(), fresh.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    # The k-means warm-up did not run again in the fresh layer (it would have moved the codes).
    assert bool(fresh.kmeans_initialized)


def test_state_changes_in_training_mode_only() -> None:
    layer = vqfunc.VectorQuantize(6, 8, replace_freq=3, ema_decay=0.5)
    x = _batches(1)[0]
    snapshot = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.eval()
    layer(x)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    layer.train()
    layer(x)
    assert not torch.equal(layer.ema_counts, snapshot["ema_counts"])
    assert not torch.equal(layer.replace_counters, snapshot["replace_counters"])


def test_functional_call_never_mutates_what_it_is_given_nor_the_layer() -> None:
    layer = vqfunc.VectorQuantize(6, 8, replace_freq=1, ema_decay=0.5, kmeans_init=True)
    x = _batches(1)[0]
    params = {k: v.detach().clone() + 1.0 for k, v in layer.named_parameters()}
    buffers = {k: v.clone() for k, v in layer.named_buffers()}
    given = {k: v.clone() for k, v in {**params, **buffers}.items()}
    own = {k: v.clone() for k, v in layer.state_dict().items()}
    z_q, _ = torch.func.functional_call(layer, {**params, **buffers}, (x,))
    for k, v in {**params, **buffers}.items():
        assert torch.equal(v, given[k]), k
    for k, v in layer.state_dict().items():
        assert torch.equal(v, own[k]), k
    expected = vqfunc.quantize(vqfunc.VQParams(**params), x, layer.cfg)[0]
    torch.testing.assert_close(z_q, expected)
    # Back on its own tensors, the layer trains again.
    layer(x)
    assert bool(layer.kmeans_initialized)


def test_updates_follow_the_tensors_after_a_dtype_move() -> None:
    layer = vqfunc.VectorQuantize(6, 8, replace_freq=1, dim=-1).double()
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    before = layer.codebook.detach().clone()
    _, misc = layer(x)  # with replace_freq=1, every unused code is replaced at once
    unused = misc["histogram"][0] == 0
    assert layer.codebook.dtype == torch.float64
    assert bool(unused.any())
    assert not torch.isclose(layer.codebook.detach()[unused], before[unused]).all(-1).any()
    assert torch.equal(layer.codebook.detach()[~unused], before[~unused])


def test_load_state_copies_a_record() -> None:
    layer = vqfunc.VectorQuantize(6, 8, replace_freq=5)
    state = layer.state._replace(
        replace=layer.state.replace._replace(counters=torch.full((1, 8), 2, dtype=torch.long))
    )
    layer.load_state(state)
    assert layer.replace_counters.tolist() == [[2] * 8]


def test_functional_step_matches_the_layer() -> None:
    """quantize + update_state threaded by hand equals the layer's training forward."""
    layer = vqfunc.VectorQuantize(6, 8, replace_freq=2, ema_decay=0.8, groups=2, share=False)
    params = vqfunc.VQParams(*(p.detach().clone() for p in layer.params))
    state = optree.tree_map(torch.clone, layer.state)
    for i, x in enumerate(_batches(4)):
        torch.manual_seed(i)
        z_ref, out = vqfunc.quantize(params, x, layer.cfg)
        params, state = vqfunc.update_state(params, state, out, layer.cfg)
        torch.manual_seed(i)
        z_q, _ = layer(x)
        torch.testing.assert_close(z_q, z_ref)
    torch.testing.assert_close(layer.codebook.detach(), params.codebook)
    for a, b in zip(layer.state, state, strict=True):
        torch.testing.assert_close(a, b)


def test_gradients_are_those_of_the_codebook_the_forward_pass_used() -> None:
    """The in-place update after the forward pass leaves its backward pass intact."""
    kw = {"dist": "cosine", "affine_lr": 1.0, "replace_freq": 1, "dim": -1}
    layer = vqfunc.VectorQuantize(6, 8, generator=torch.Generator().manual_seed(0), **kw)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    params = vqfunc.VQParams(*(p.detach().clone().requires_grad_(True) for p in layer.params))
    z_ref, out = vqfunc.quantize(params, x, layer.cfg)
    (z_ref.sum() + out.loss).backward()
    z_q, misc = layer(x)
    (z_q.sum() + misc["loss"]).backward()
    assert not torch.equal(layer.codebook.detach(), params.codebook.detach())  # replaced
    for own, ref in zip(layer.params, params, strict=True):
        torch.testing.assert_close(own.grad, ref.grad)
