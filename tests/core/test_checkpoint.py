"""Checkpoints: flat dicts of plain tensors, exact round trips, functional <-> layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optree
import pytest
import torch
from torch import nn

import vqfunc
from vqfunc import checkpoint
from vqfunc._state import VQState, init_state, update_state

CFG = vqfunc.VQConfig(
    feature_size=8, num_codes=12, dim=-1, groups=2, share=False, affine_lr=1.0,
    replace_freq=2, ema_decay=0.8,
)  # fmt: skip
LAYER_KW: dict[str, object] = dict(
    dim=-1, groups=2, share=False, affine_lr=1.0, replace_freq=2, ema_decay=0.8
)


def trained_state(steps: int = 3) -> tuple[vqfunc.VQParams, VQState]:
    """Params and state moved away from their initial values by a few functional steps."""
    g = torch.Generator().manual_seed(0)
    params = vqfunc.init_params(CFG, generator=g)
    params = params._replace(affine_scale=0.1 * torch.randn(params.affine_scale.shape, generator=g))
    state = init_state(params, CFG)
    for _ in range(steps):
        _, out = vqfunc.quantize(params, torch.randn(20, 8, generator=g), CFG)
        params, state = update_state(params, state, out, CFG, generator=g)
    return params, state


def assert_same(a: object, b: object) -> None:
    for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)


def test_flatten_names_fields_by_path_and_copies_plain_tensors() -> None:
    params, state = trained_state()
    flat = checkpoint.flatten({"vq": params, "levels": [state]})
    assert list(flat) == [
        "levels.0.ema.counts",
        "levels.0.ema.sums",
        "levels.0.replace.counters",
        "levels.0.replace.usage",
        *(f"vq.{name}" for name in vqfunc.VQParams._fields),
    ]
    assert torch.equal(flat["vq.codebook"], params.codebook)
    pointers = [t.untyped_storage().data_ptr() for t in flat.values() if t.numel()]
    assert len(set(pointers)) == len(pointers)  # no shared storage (safetensors refuses it)
    assert all(t.is_contiguous() and not t.requires_grad for t in flat.values())
    flat["vq.codebook"].zero_()  # a copy: the params are untouched
    assert not torch.equal(params.codebook, flat["vq.codebook"])


def test_flatten_copies_views_and_non_contiguous_tensors_into_their_own_storage() -> None:
    base = torch.arange(12.0).reshape(3, 4)
    flat = checkpoint.flatten({"t": base.t(), "row": base[1]})
    assert flat["t"].is_contiguous() and torch.equal(flat["t"], base.t())
    assert flat["row"].untyped_storage().nbytes() == 4 * 4


def test_torch_save_round_trip_is_exact(tmp_path: Path) -> None:
    params, state = trained_state()
    path = tmp_path / "ckpt.pt"
    checkpoint.save((params, state), path)
    like = (vqfunc.init_params(CFG), init_state(vqfunc.init_params(CFG), CFG))
    loaded_params, loaded_state = checkpoint.load(path, like)
    assert_same(loaded_params, params)
    assert_same(loaded_state, state)
    assert isinstance(loaded_params, vqfunc.VQParams) and isinstance(loaded_state, VQState)


def test_safetensors_round_trip_is_exact(tmp_path: Path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    params, state = trained_state()
    path = str(tmp_path / "ckpt.safetensors")
    safetensors_torch.save_file(checkpoint.layer_state_dict(params, state), path)
    loaded_params, loaded_state = checkpoint.from_layer_state_dict(
        safetensors_torch.load_file(path), CFG
    )
    assert_same(loaded_params, params)
    assert_same(loaded_state, state)


def test_unflatten_names_missing_unexpected_and_mismatched_keys() -> None:
    params, _ = trained_state(steps=0)
    flat = checkpoint.flatten(params)
    with pytest.raises(KeyError, match=r"missing \['affine_bias'\]"):
        checkpoint.unflatten({k: v for k, v in flat.items() if k != "affine_bias"}, params)
    with pytest.raises(KeyError, match=r"unexpected \['extra'\]"):
        checkpoint.unflatten({**flat, "extra": torch.zeros(1)}, params)
    with pytest.raises(ValueError, match=r"codebook has shape \(3, 4\)"):
        checkpoint.unflatten({**flat, "codebook": torch.zeros(3, 4)}, params)
    with pytest.raises(ValueError, match="bare tensor has no name"):
        checkpoint.flatten(torch.zeros(2))


def test_functional_state_loads_into_a_layer_and_back_exactly() -> None:
    params, state = trained_state()
    layer = vqfunc.VectorQuantize(8, 12, **LAYER_KW)
    layer.load_state_dict(checkpoint.layer_state_dict(params, state))
    assert_same(layer.params, params)
    assert_same(layer.state, state)
    assert bool(layer.kmeans_initialized)
    back_params, back_state = checkpoint.from_layer_state_dict(layer.state_dict(), layer.cfg)
    assert_same(back_params, params)
    assert_same(back_state, state)
    # Copies: training the layer further leaves them unchanged.
    layer.train()
    layer(torch.randn(10, 8))
    assert_same(back_params, params)


def test_layer_and_functional_continue_identically_from_one_checkpoint() -> None:
    torch.manual_seed(0)
    layer = vqfunc.VectorQuantize(8, 12, **LAYER_KW)
    for _ in range(2):
        layer(torch.randn(16, 8))
    params, state = checkpoint.from_layer_state_dict(layer.state_dict(), layer.cfg)
    batches = [torch.randn(16, 8) for _ in range(3)]
    # Both draw the replacement randomness from the global generator: same seed per step.
    for seed, x in enumerate(batches):
        torch.manual_seed(seed)
        layer(x)
        torch.manual_seed(seed)
        _, out = vqfunc.quantize(params, x, CFG)
        params, state = update_state(params, state, out, CFG)
    assert_same(layer.params, params)
    assert_same(layer.state, state)


def test_prefixed_keys_read_one_layer_of_a_model() -> None:
    model = nn.Sequential(nn.Linear(4, 8), vqfunc.VectorQuantize(8, 12, **LAYER_KW))
    params, state = checkpoint.from_layer_state_dict(model.state_dict(), CFG, prefix="1.")
    assert_same(params, model[1].params)
    assert_same(state, model[1].state)
    with pytest.raises(ValueError, match=r"1.codebook has shape \(2, 6, 4\)"):
        checkpoint.from_layer_state_dict(
            model.state_dict(), CFG.replace(groups=1, share=True), prefix="1."
        )


@pytest.mark.parametrize(
    ("layer", "dropped"),
    [(lambda: vqfunc.VectorQuantize(4, 8, dim=-1, replace_freq=3), ("replace_usage",)),
     (lambda: vqfunc.ResidualVectorQuantize(4, 8, levels=2, dim=-1, ema_decay=0.9),
      ("replace_usage", "ema_counts", "ema_sums"))],
)  # fmt: skip
def test_layer_state_dicts_from_before_a_buffer_existed_read_like_the_layer_loads_them(
    layer: Any, dropped: tuple[str, ...]
) -> None:
    trained = layer()
    trained(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)))
    old = {k: v for k, v in trained.state_dict().items() if k not in dropped}
    params, state = checkpoint.from_layer_state_dict(old, trained.cfg)
    fresh = layer()
    fresh.load_state_dict(old)
    assert torch.equal(params.codebook, fresh.codebook)
    for name, value in fresh.state_dict().items():
        if name in dropped:
            record, field = name.split("_", 1)
            assert torch.equal(getattr(getattr(state, record), field), value), name
