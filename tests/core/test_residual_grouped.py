"""Grouped residual VQ (`channel_groups`): each channel group has a residual stack of its own.

References, written here: a float64 brute-force residual quantizer (`torch.cdist` + argmin,
level after level) per group, and the ungrouped functions run by hand on each group's
channels with that group's params (a Python loop, not the library's `vmap`).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import vqfunc
from vqfunc._replace import draw_replace_randomness
from vqfunc.residual import ResidualConfig

G, L, F = 3, 3, 6
D = F // G


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


CONFIGS: dict[str, dict[str, Any]] = {
    "shared": dict(num_codes=8, share=True),
    "separate": dict(num_codes=8 * L, share=False),
    "per_level": dict(num_codes=(8, 5, 3), share=False),
    "projected": dict(num_codes=8 * L, share=False, codebook_dim=1),
    "affine": dict(num_codes=8 * L, share=False, affine_lr=1.0, affine_groups=2),
    "rotation": dict(num_codes=8, share=True, estimator="rotation"),
}


def _setup(name: str, seed: int = 0, **kw: Any) -> tuple[ResidualConfig, Any]:
    cfg = ResidualConfig(feature_size=F, levels=L, dim=-1, channel_groups=G, **CONFIGS[name], **kw)
    return cfg, vqfunc.residual.init_params(cfg, generator=_gen(seed))


def _group(params: Any, g: int) -> Any:
    return type(params)(*(t[g] for t in params))


def _slice(x: torch.Tensor, g: int) -> torch.Tensor:
    return x[..., g * D : (g + 1) * D]


def _brute_force(codebook: torch.Tensor, x: torch.Tensor, cfg: ResidualConfig, n: int) -> Any:
    """One group in float64: `(codes [M, n], z_q [M, D])`."""
    residual = x.double()
    codes, total = [], torch.zeros_like(residual)
    for level in range(n):
        size = cfg.level_sizes[level]
        book = (codebook if cfg.share else codebook[level, :size]).double()
        c = torch.cdist(residual, book).argmin(-1)
        codes.append(c)
        total = total + book[c]
        residual = residual - book[c]
    return torch.stack(codes, -1), total


def test_config_shapes_and_errors() -> None:
    cfg, params = _setup("separate")
    assert cfg.group_config.feature_size == D and cfg.group_config.channel_groups == 1
    assert params.codebook.shape == cfg.codebook_shape == (G, L, 8, D)
    assert ResidualConfig(feature_size=F, num_codes=8).codebook_shape == (8, F)
    proj, p = _setup("projected")
    assert p.proj_in.shape == proj.projection_shapes["proj_in"] == (G, L, D, 1)
    assert p.proj_out_bias.shape == (G, L, D)
    with pytest.raises(ValueError, match=r"channel_groups=4 must divide feature_size=6"):
        ResidualConfig(feature_size=6, num_codes=8, channel_groups=4)
    with pytest.raises(ValueError, match=r"channel_groups must be"):
        ResidualConfig(feature_size=6, num_codes=8, channel_groups=0)


@pytest.mark.parametrize("name", ["shared", "separate", "per_level"])
@pytest.mark.parametrize("n", [1, L])
def test_codes_and_output_equal_a_brute_force_per_group(name: str, n: int) -> None:
    cfg, params = _setup(name)
    x = 2 * torch.randn(4, 5, F, generator=_gen(1))
    z_q, out = vqfunc.residual.quantize(params, x, cfg, n_levels=n)
    assert z_q.shape == x.shape and out.codes.shape == (4, 5, G, n)
    assert out.residuals.shape == (4, 5, G, n + 1, D) and out.histogram.shape[0] == G
    for g in range(G):
        codes, total = _brute_force(params.codebook[g], _slice(x, g).reshape(-1, D), cfg, n)
        assert torch.equal(out.codes[..., g, :].reshape(-1, n), codes)
        torch.testing.assert_close(_slice(z_q, g).reshape(-1, D).double(), total)
    loss = (x.double() - z_q.double()).square().mean()  # the commitment loss of the full vector
    torch.testing.assert_close(out.loss.double(), loss)
    torch.testing.assert_close(vqfunc.residual.dequantize(params, out.codes, cfg, n_levels=n), z_q)


def _per_group(params: Any, x: torch.Tensor, cfg: ResidualConfig, **kw: Any) -> list[Any]:
    return [
        vqfunc.residual.quantize(_group(params, g), _slice(x, g), cfg.group_config, **kw)
        for g in range(G)
    ]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_grouped_equals_separate_quantizers_with_mask_levels_and_depth(name: str) -> None:
    cfg, params = _setup(name)
    params = type(params)(*(t.requires_grad_() for t in params))
    x = torch.randn(6, 4, F, generator=_gen(2), requires_grad=True)
    mask = torch.rand(6, 4, generator=_gen(3)) * (torch.rand(6, 4, generator=_gen(4)) > 0.3)
    depth = torch.tensor([1, 2, 1, 2, 2, 1]).view(6, 1)
    kw: dict[str, Any] = dict(mask=mask, n_levels=2, depth=depth)
    w = torch.randn(6, 4, F, generator=_gen(5))
    z_q, out = vqfunc.residual.quantize(params, x, cfg, **kw)
    grads = torch.autograd.grad((z_q * w).sum() + out.loss, [x, *params], allow_unused=True)
    refs = _per_group(params, x, cfg, **kw)
    ref_loss = sum(o.loss for _, o in refs) / G
    ref_out = torch.cat([z for z, _ in refs], -1)
    ref_total = sum((z * _slice(w, g)).sum() for g, (z, _) in enumerate(refs)) + ref_loss
    ref_grads = torch.autograd.grad(ref_total, [x, *params], allow_unused=True)
    torch.testing.assert_close(z_q, ref_out)
    torch.testing.assert_close(out.loss, ref_loss)
    torch.testing.assert_close(out.perplexity, sum(o.perplexity for _, o in refs) / G)
    for g, (_, o) in enumerate(refs):
        assert torch.equal(out.codes[..., g, :], o.codes)
        torch.testing.assert_close(out.residuals[..., g, :, :], o.residuals)
        torch.testing.assert_close(out.histogram[g], o.histogram)
        torch.testing.assert_close(_slice(out.codewords, g), o.codewords)
        assert torch.equal(out.depth, o.depth)
    for got, ref in zip(grads, ref_grads, strict=True):
        if ref is None:
            assert got is None or not bool(got.any())
        else:
            assert got is not None
            torch.testing.assert_close(got, ref)
    assert grads[0] is not None and bool(grads[0].abs().sum() > 0)


def test_a_non_finite_entry_invalidates_the_row_in_every_group() -> None:
    cfg, params = _setup("separate")
    x = torch.randn(5, F, generator=_gen(6))
    x[2, 0] = torch.nan  # group 0 only
    z_q, out = vqfunc.residual.quantize(params, x, cfg)
    assert out.valid.tolist() == [True, True, False, True, True] and int(out.num_invalid) == 1
    assert bool((out.codes[2] == 0).all())
    clean = x.clone()
    clean[2] = 0.0
    _, ref = vqfunc.residual.quantize(params, clean, cfg, mask=out.valid)
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.histogram, ref.histogram)
    assert bool(torch.isfinite(z_q).all())


@pytest.mark.parametrize("name", ["shared", "separate", "per_level", "projected"])
def test_update_state_equals_separate_steps(name: str) -> None:
    cfg, params = _setup(name, ema_decay=0.8, replace_freq=1)
    state = vqfunc.residual.init_state(params, cfg)
    assert state.ema.counts.shape[0] == G and state.replace.counters.shape[0] == G
    x = torch.randn(7, 3, F, generator=_gen(7))
    x[0, 0, 0] = torch.inf
    x[1] += 30.0  # far from every code: other codes stay dead
    mask = torch.rand(7, 3, generator=_gen(8)) > 0.2
    depth = torch.tensor([2, 1, 2, 2, 1, 2, 2]).view(7, 1)
    _, out = vqfunc.residual.quantize(params, x, cfg, mask=mask, n_levels=2, depth=depth)
    draws = [draw_replace_randomness(21, cfg.group_config, generator=_gen(9 + g)) for g in range(G)]
    randomness = type(draws[0])(*(torch.stack(t) for t in zip(*draws, strict=True)))
    new_params, new_state = vqfunc.residual.update_state(
        params, state, out, cfg, mask=mask, randomness=randomness
    )
    # The row with an Inf in group 0 is invalid in every group: NaN in each reference.
    x_ref = torch.where(torch.isfinite(x).all(-1, keepdim=True), x, torch.nan)
    for g in range(G):
        group_state = type(state)(*(type(r)(*(t[g] for t in r)) for r in state))
        _, o = vqfunc.residual.quantize(
            _group(params, g),
            _slice(x_ref, g),
            cfg.group_config,
            mask=mask,
            n_levels=2,
            depth=depth,
        )
        p_ref, s_ref = vqfunc.residual.update_state(
            _group(params, g), group_state, o, cfg.group_config, mask=mask, randomness=draws[g]
        )
        for got, ref in zip(_group(new_params, g), p_ref, strict=True):
            torch.testing.assert_close(got, ref)
        for record, ref_record in zip(new_state, s_ref, strict=True):
            for got, ref in zip(record, ref_record, strict=True):
                torch.testing.assert_close(got[g], ref)
    assert not torch.equal(new_params.codebook, params.codebook)


def test_ema_counts_follow_the_formula_in_float64() -> None:
    cfg, params = _setup("separate", ema_decay=0.7, ema_eps=0.0)
    params = params._replace(codebook=params.codebook.double())
    state = vqfunc.residual.init_state(params, cfg)
    x = torch.randn(9, F, generator=_gen(11), dtype=torch.float64)
    _, out = vqfunc.residual.quantize(params, x, cfg)
    _, new_state = vqfunc.residual.update_state(params, state, out, cfg)
    for g in range(G):
        codes, _ = _brute_force(params.codebook[g], _slice(x, g), cfg, L)
        for level in range(L):
            hits = torch.bincount(codes[:, level], minlength=8).double()
            ref = 0.7 * 1.0 + 0.3 * hits
            torch.testing.assert_close(new_state.ema.counts[g, level], ref)


def test_warmup_fits_each_group_on_its_channels() -> None:
    cfg, params = _setup("separate")
    x = torch.randn(40, F, generator=_gen(12))
    x[3, -1] = torch.nan  # the last group only: the row is left out of every group
    fitted = vqfunc.residual.warmup_params(params, x, cfg, method="kmeans", generator=_gen(13))
    g_ref = _gen(13)
    keep = torch.isfinite(x).all(-1)
    for g in range(G):
        ref = vqfunc.residual.warmup_params(
            _group(params, g),
            _slice(x[keep], g),
            cfg.group_config,
            method="kmeans",
            generator=g_ref,
        )
        torch.testing.assert_close(fitted.codebook[g], ref.codebook)


def test_bitrate_counts_every_group() -> None:
    cfg = ResidualConfig(feature_size=F, num_codes=(1024, 256), levels=2, share=False)
    grouped = cfg.replace(channel_groups=G)
    assert vqfunc.residual.bitrate(grouped, 75.0) == G * 75.0 * (10 + 8)
    assert vqfunc.residual.bitrate(grouped, 75.0, n_levels=1) == G * 750.0


def test_bad_params_codes_and_randomness_are_refused() -> None:
    cfg, params = _setup("separate")
    flat = vqfunc.residual.init_params(cfg.group_config)
    x = torch.randn(4, F)
    with pytest.raises(
        ValueError, match=r"params.codebook has shape \(3, 8, 2\).*channel_groups=3.*\(3, 3, 8, 2\)"
    ):
        vqfunc.residual.quantize(flat, x, cfg)
    _, out = vqfunc.residual.quantize(params, x, cfg)
    with pytest.raises(ValueError, match=r"codes must be \[\*B, channel_groups=3, levels\]"):
        vqfunc.residual.dequantize(params, out.codes[..., 0, :], cfg)
    bad = out.codes.clone()
    bad[1, 2, 0] = 8
    with pytest.raises(IndexError, match=r"codes holds 8, outside \[0, 8\)"):
        vqfunc.residual.dequantize(params, bad, cfg)
    with pytest.raises(ValueError, match=r"depth holds 0"):
        vqfunc.residual.quantize(params, x, cfg, depth=torch.zeros(4, dtype=torch.long))
    cfg_r = cfg.replace(replace_freq=1)
    state = vqfunc.residual.init_state(params, cfg_r)
    one = draw_replace_randomness(4, cfg_r.group_config)
    expected = r"state.ema.counts is \(3, 0\).*channel_groups=3.*\(3, 3, 0\)"
    with pytest.raises(ValueError, match=expected):
        vqfunc.residual.update_state(
            params, vqfunc.residual.init_state(flat, cfg_r.group_config), out, cfg_r
        )
    before = [t.clone() for t in params]
    with pytest.raises(ValueError, match=r"randomness must be a ReplaceRandomness.*size 3"):
        vqfunc.residual.update_state(params, state, out, cfg_r, randomness=one)
    assert all(torch.equal(a, b) for a, b in zip(params, before, strict=True))


def test_vmap_over_a_stack_of_grouped_params() -> None:
    cfg = ResidualConfig(feature_size=F, num_codes=8, levels=L, dim=-1, channel_groups=G)
    stack = [vqfunc.residual.init_params(cfg, generator=_gen(20 + i)) for i in range(2)]
    params = type(stack[0])(*(torch.stack(t) for t in zip(*stack, strict=True)))
    x = torch.randn(5, F, generator=_gen(22))

    def encode(p: Any) -> torch.Tensor:
        return vqfunc.residual.quantize(p, x, cfg)[0]

    batched = torch.func.vmap(encode)(params)
    for i, p in enumerate(stack):
        torch.testing.assert_close(batched[i], encode(p))


class _TwoRanks:
    """Two ranks in one process: records the other rank's `reduce_sum` calls, then adds them
    call by call (in order, as every rank runs the groups in the same order)."""

    def __init__(self, recorded: list[tuple[torch.Tensor, ...]] | None = None) -> None:
        self.recorded = recorded
        self.calls: list[tuple[torch.Tensor, ...]] = []

    def reduce_sum(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.calls.append(tuple(t.detach().clone() for t in tensors))
        if self.recorded is None:
            return tuple(t.clone() for t in tensors)
        other = self.recorded[len(self.calls) - 1]
        return tuple(t + o for t, o in zip(tensors, other, strict=True))


@pytest.mark.parametrize("name", ["shared", "separate", "projected"])
def test_synchronized_ema_of_two_ranks_equals_the_union_batch(name: str) -> None:
    cfg, params = _setup(name, ema_decay=0.6)
    state = vqfunc.residual.init_state(params, cfg)
    a, b = torch.randn(5, F, generator=_gen(30)), torch.randn(8, F, generator=_gen(31))

    def step(x: torch.Tensor, sync: Any) -> Any:
        _, out = vqfunc.residual.quantize(params, x, cfg)
        return vqfunc.residual.update_state(params, state, out, cfg, sync=sync)

    other = _TwoRanks()
    step(b, other)
    assert len(other.calls) == G  # one reduction per group
    synced = step(a, _TwoRanks(other.calls))
    union = step(torch.cat([a, b]), None)
    torch.testing.assert_close(synced[0].codebook, union[0].codebook)
    torch.testing.assert_close(synced[1].ema.counts, union[1].ema.counts)
    torch.testing.assert_close(synced[1].ema.sums, union[1].ema.sums)
