"""Bad data never poisons a codebook: the policy of `vqfunc._quantize`, path by path.

Non-finite input rows (and zero-norm ones with cosine) are searched as zeros, take code 0 and
distance NaN, and count as masked in every statistic; non-finite codes (and zero-norm ones
with cosine) are never selected. Every stateful path is fed such data, and no parameter or
state tensor may become non-finite.
"""

from __future__ import annotations

import threading

import optree
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vqfunc
from vqfunc.residual import ResidualConfig


def _all_finite(tree: object) -> bool:
    return all(bool(t.isfinite().all()) for t in optree.tree_leaves(tree) if t.is_floating_point())


def _poison(x: torch.Tensor, rows: list[int], values: list[float]) -> torch.Tensor:
    x = x.clone()
    for row, value in zip(rows, values, strict=False):
        x[row, row % x.shape[1]] = value
    return x


BAD = st.sampled_from([float("nan"), float("inf"), -float("inf")])


@st.composite
def configs(draw: st.DrawFn) -> vqfunc.VQConfig:
    groups = draw(st.sampled_from([1, 2]))
    return vqfunc.VQConfig(
        feature_size=4,
        num_codes=8,
        dim=-1,
        groups=groups,
        share=draw(st.booleans()),
        dist=draw(st.sampled_from(["euclidean", "cosine"])),
        affine_lr=draw(st.sampled_from([0.0, 1.0])),
        estimator=draw(st.sampled_from(["ste", "rotation"])),
        replace_freq=draw(st.sampled_from([0, 1, 2])),
        ema_decay=draw(st.sampled_from([0.0, 0.9])),
    )


@given(
    cfg=configs(),
    bad_rows=st.lists(st.integers(0, 23), min_size=1, max_size=6, unique=True),
    bad=st.lists(BAD, min_size=6, max_size=6),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=60, deadline=None)
def test_non_finite_rows_never_reach_params_or_state(
    cfg: vqfunc.VQConfig, bad_rows: list[int], bad: list[float], seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    params = vqfunc.init_params(cfg, generator=g)
    state = vqfunc.init_state(params, cfg)
    clean = torch.randn(24, 4, generator=g)
    x = _poison(clean, bad_rows, bad).requires_grad_()
    for _ in range(3):
        z_q, out = vqfunc.quantize(params, x, cfg)
        invalid = torch.zeros(24, dtype=torch.bool)
        invalid[bad_rows] = True
        assert torch.equal(out.valid, ~invalid) and out.num_invalid.item() == len(bad_rows)
        assert (out.codes[invalid] == 0).all() and out.distances[invalid].isnan().all()
        assert out.distances[~invalid].isfinite().all()
        assert out.loss.isfinite() and out.perplexity.isfinite()
        assert out.histogram.sum() == (24 - len(bad_rows)) * cfg.groups
        assert z_q.isfinite().all() and out.codewords.isfinite().all()
        (grad,) = torch.autograd.grad((z_q.square().sum() + out.loss), [x])
        assert grad.isfinite().all() and (grad[invalid] == 0).all()
        params, state = vqfunc.update_state(params, state, out, cfg, generator=g)
        assert _all_finite(params) and _all_finite(state)


def test_valid_rows_quantize_as_without_the_bad_ones() -> None:
    cfg = vqfunc.VQConfig(feature_size=4, num_codes=8, dim=-1, groups=2, share=False)
    params = vqfunc.init_params(cfg, generator=torch.Generator().manual_seed(0))
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
    poisoned = _poison(x, [2, 7], [float("nan"), float("inf")])
    keep = torch.ones(10, dtype=torch.bool)
    keep[[2, 7]] = False
    _, bad = vqfunc.quantize(params, poisoned, cfg)
    _, masked = vqfunc.quantize(params, x, cfg, mask=keep)
    assert torch.equal(bad.codes[keep], masked.codes[keep])
    torch.testing.assert_close(bad.loss, masked.loss)
    assert torch.equal(bad.histogram, masked.histogram)


@pytest.mark.parametrize("dist", ["euclidean", "cosine"])
def test_non_finite_codes_are_never_selected(dist: str) -> None:
    cfg = vqfunc.VQConfig(feature_size=4, num_codes=6, dim=-1, dist=dist)
    params = vqfunc.init_params(cfg, generator=torch.Generator().manual_seed(0))
    params = params._replace(codebook=params.codebook.index_fill(0, torch.tensor([0, 3]), 0.0))
    params.codebook[0, 1] = float("nan")
    params.codebook[3, 2] = float("inf")
    _, out = vqfunc.quantize(params, torch.randn(200, 4), cfg)
    assert not torch.isin(out.codes, torch.tensor([0, 3])).any()


def test_cosine_zero_codes_are_not_selected_and_zero_inputs_not_captured() -> None:
    """The reproducer: zero vectors (unmasked padding) used to become codes by replacement,
    and then took half of the real inputs."""
    cfg = vqfunc.VQConfig(feature_size=8, num_codes=64, dim=-1, dist="cosine", replace_freq=1)
    g = torch.Generator().manual_seed(0)
    params = vqfunc.init_params(cfg, generator=g)
    params = params._replace(codebook=params.codebook.index_fill(0, torch.arange(10), 0.0))
    state = vqfunc.init_state(params, cfg)
    real = torch.randn(300, 8, generator=g)
    padded = torch.cat([real, torch.zeros(100, 8)])
    for _ in range(3):
        _, out = vqfunc.quantize(params, padded, cfg)
        zero_codes = params.codebook.norm(dim=-1) == 0
        assert not zero_codes[out.codes[:300]].any()  # 53% of real inputs went there before
        assert out.num_invalid == 100 and not out.valid[300:].any()
        params, state = vqfunc.update_state(params, state, out, cfg, generator=g)
        # A zero vector is never a replacement: every code keeps a direction.
        assert (params.codebook.norm(dim=-1) > 0).all()
    assert zero_codes.sum() < 10  # replacement gave the zero codes real directions


def test_nan_rows_in_float64_do_not_take_every_vector_to_a_nan_code() -> None:
    """The reproducer: in float64 one NaN batch used to make every later output NaN."""
    cfg = vqfunc.VQConfig(feature_size=4, num_codes=16, dim=-1, ema_decay=0.9, replace_freq=2)
    g = torch.Generator().manual_seed(0)
    params = vqfunc.init_params(cfg, generator=g, dtype=torch.float64)
    state = vqfunc.init_state(params, cfg)
    x = torch.randn(64, 4, generator=g, dtype=torch.float64)
    _, out = vqfunc.quantize(params, _poison(x, list(range(0, 64, 3)), [float("nan")] * 22), cfg)
    params, state = vqfunc.update_state(params, state, out, cfg, generator=g)
    z_q, out = vqfunc.quantize(params, x, cfg)
    assert z_q.isfinite().all() and out.loss.isfinite() and _all_finite((params, state))


@pytest.mark.parametrize("share", [True, False])
def test_residual_levels_skip_non_finite_rows(share: bool) -> None:
    cfg = ResidualConfig(feature_size=4, num_codes=12, levels=3, share=share, dim=-1)
    cfg = cfg.replace(replace_freq=1)
    g = torch.Generator().manual_seed(0)
    params = vqfunc.residual.init_params(cfg, generator=g)
    state = vqfunc.residual.init_state(params, cfg)
    bad = [float("nan"), float("inf"), -float("inf")]
    x = _poison(torch.randn(30, 4, generator=g), [1, 5, 9], bad)
    for _ in range(3):
        z_q, out = vqfunc.residual.quantize(params, x, cfg)
        assert out.num_invalid == 3 and (out.codes[[1, 5, 9]] == 0).all()
        assert z_q.isfinite().all() and out.loss.isfinite()
        assert out.histogram.sum() == 27 * 3
        params, state = vqfunc.residual.update_state(params, state, out, cfg, generator=g)
        assert _all_finite(params)
    warmed = vqfunc.residual.warmup_params(params, x, cfg, method="kmeans", generator=g)
    assert _all_finite(warmed)


@pytest.mark.parametrize("method", ["data", "kmeans"])
def test_warmups_leave_cosine_zero_vectors_out(method: str) -> None:
    cfg = vqfunc.VQConfig(feature_size=4, num_codes=8, dim=-1, dist="cosine")
    params = vqfunc.init_params(cfg)
    x = torch.cat([torch.randn(50, 4), torch.zeros(200, 4)])
    warmed = vqfunc.warmup_params(params, x, cfg, method=method)
    assert (warmed.codebook.norm(dim=-1) > 0.1).all()


@pytest.mark.parametrize("layer_type", ["vq", "residual"])
def test_layers_train_through_a_nan_batch(layer_type: str) -> None:
    torch.manual_seed(0)
    if layer_type == "vq":
        layer: torch.nn.Module = vqfunc.VectorQuantize(
            4, 16, dim=-1, ema_decay=0.9, replace_freq=2, kmeans_init=True
        )
    else:
        layer = vqfunc.ResidualVectorQuantize(4, 16, 2, dim=-1, replace_freq=2, kmeans_init=True)
    layer.train()
    for step in range(6):
        x = torch.randn(40, 4)
        if step in (0, 3):  # the k-means warm-up batch, then a later one
            x[::4] = float("nan")
        z_q, misc = layer(x)
        assert misc["loss"].isfinite() and z_q[misc["valid"]].isfinite().all()
        assert all(t.isfinite().all() for t in layer.state_dict().values() if t.is_floating_point())


def test_half_layer_keeps_its_state_in_float32() -> None:
    """The reproducer: `.half()` with EMA made every code non-finite within three steps."""
    layer = vqfunc.VectorQuantize(8, 16, dim=-1, ema_decay=0.9, replace_freq=5).half()
    assert layer.codebook.dtype == torch.float16
    assert layer.ema_counts.dtype == layer.ema_sums.dtype == torch.float32
    assert layer.replace_counters.dtype == torch.int64
    layer.bfloat16()
    assert layer.codebook.dtype == torch.bfloat16 and layer.ema_sums.dtype == torch.float32
    layer.half().train()
    x = 3.0 * torch.randn(70_000, 8, generator=torch.Generator().manual_seed(0)).half()
    for _ in range(5):
        z_q, _ = layer(x)
    assert z_q.dtype == torch.float16
    assert layer.codebook.isfinite().all() and layer.ema_sums.isfinite().all()
    assert vqfunc.VectorQuantize(8, 16, ema_decay=0.5).double().ema_sums.dtype == torch.float64


def test_masks_outside_zero_one_are_refused() -> None:
    cfg = vqfunc.VQConfig(feature_size=4, num_codes=8, dim=-1)
    params = vqfunc.init_params(cfg)
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"quantize: mask holds -1\.0; expected a bool mask or"):
        vqfunc.quantize(params, x, cfg, mask=torch.tensor([1.0, 1.0, -1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match=r"mask holds 2; expected"):
        vqfunc.quantize(params, x, cfg, mask=torch.tensor([1, 2, 0, 0, 1]))
    _, out = vqfunc.quantize(params, x, cfg, mask=torch.tensor([1, 0, 0, 1, 1]))
    assert out.histogram.sum() == 3


def test_negative_and_out_of_range_codes_are_refused() -> None:
    cfg = vqfunc.VQConfig(feature_size=4, num_codes=8, dim=-1)
    params = vqfunc.init_params(cfg)
    for codes in (torch.tensor([0, -1, 3]), torch.tensor([8, 1, 2])):
        with pytest.raises(IndexError, match=r"dequantize: codes holds -?\d+, outside \[0, 8\)"):
            vqfunc.dequantize(params, codes, cfg)
        with pytest.raises(IndexError, match=r"codebook_loss: codes holds -?\d+, outside"):
            vqfunc.codebook_loss(params, torch.randn(3, 4), codes, cfg)
    rcfg = ResidualConfig(feature_size=4, num_codes=6, levels=2, share=False)
    rparams = vqfunc.residual.init_params(rcfg)
    with pytest.raises(IndexError, match=r"outside \[0, 3\)"):
        vqfunc.residual.dequantize(rparams, torch.tensor([[0, 3]]), rcfg)


def test_no_vq_is_scoped_to_its_thread() -> None:
    layer = vqfunc.VectorQuantize(6, 8, dim=-1)
    x = torch.randn(3, 6)
    inside, outside = threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def other_thread() -> None:
        inside.wait()
        seen["identity"] = torch.equal(layer(x)[0], x)
        seen["enabled"] = layer.vq_enabled
        outside.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    for block in (vqfunc.no_vq, lambda: vqfunc.no_vq(layer)):
        seen.clear()
        outside.clear()
        with block():
            assert torch.equal(layer(x)[0], x) and not layer.vq_enabled
            inside.set()
            outside.wait(timeout=30)
        inside.clear()
        assert seen == {"identity": False, "enabled": True}
        if block is vqfunc.no_vq:
            thread.join(timeout=30)
            thread = threading.Thread(target=other_thread)
            thread.start()
    inside.set()
    thread.join(timeout=30)
