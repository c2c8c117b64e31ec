"""EMA codebook updates against a hand-written two-step reference."""

from __future__ import annotations

import optree
import pytest
import torch
import torch.nn.functional as F

import vqfunc
from vqfunc._affine import effective_codebook


def _reference_step(
    n_run: list[float],
    m_run: list[list[float]],
    z: list[list[float]],
    q: list[int],
    decay: float,
    eps: float,
    weights: list[float] | None = None,
) -> tuple[list[float], list[list[float]], list[list[float]]]:
    """One EMA step written out code by code, in Python floats (double precision)."""
    k, d = len(n_run), len(m_run[0])
    weights = weights or [1.0] * len(z)
    n_batch = [0.0] * k
    s_batch = [[0.0] * d for _ in range(k)]
    for zi, qi, wi in zip(z, q, weights, strict=True):
        n_batch[qi] += wi
        for j in range(d):
            s_batch[qi][j] += wi * zi[j]
    n_new = [decay * n_run[c] + (1 - decay) * n_batch[c] for c in range(k)]
    m_new = [
        [decay * m_run[c][j] + (1 - decay) * s_batch[c][j] for j in range(d)] for c in range(k)
    ]
    total = sum(n_new)
    smoothed = [(n_new[c] + eps) / (total + k * eps) * total for c in range(k)]
    codes = [[m_new[c][j] / smoothed[c] for j in range(d)] for c in range(k)]
    return n_new, m_new, codes


def _nearest(z: list[list[float]], codes: list[list[float]]) -> list[int]:
    dist = lambda a, b: sum((x - y) ** 2 for x, y in zip(a, b, strict=True))  # noqa: E731
    return [min(range(len(codes)), key=lambda c: dist(zi, codes[c])) for zi in z]


def test_ema_matches_a_hand_computed_two_step_update() -> None:
    decay, eps = 0.8, 1e-3
    cfg = vqfunc.VQConfig(feature_size=2, num_codes=3, dim=-1, ema_decay=decay, ema_eps=eps)
    codebook = torch.tensor([[0.0, 0.0], [3.0, 3.0], [-4.0, 1.0]], dtype=torch.float64)
    params = vqfunc.init_params(cfg, dtype=torch.float64)._replace(codebook=codebook)
    state = vqfunc.init_state(params, cfg)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(7, 2, generator=g, dtype=torch.float64) * 2 for _ in range(2)]

    n_run = [1.0, 1.0, 1.0]
    m_run = codebook.tolist()
    codes_ref = codebook.tolist()
    for x in batches:
        q = _nearest(x.tolist(), codes_ref)
        n_run, m_run, codes_ref = _reference_step(n_run, m_run, x.tolist(), q, decay, eps)
        _, out = vqfunc.quantize(params, x, cfg)
        assert out.codes.tolist() == q
        params, state = vqfunc.update_state(params, state, out, cfg)

    torch.testing.assert_close(params.codebook, torch.tensor(codes_ref, dtype=torch.float64))
    torch.testing.assert_close(state.ema.counts[0], torch.tensor(n_run, dtype=torch.float64))
    torch.testing.assert_close(state.ema.sums[0], torch.tensor(m_run, dtype=torch.float64))


def test_masked_rows_change_nothing() -> None:
    cfg = vqfunc.VQConfig(feature_size=4, num_codes=5, dim=-1, ema_decay=0.9)
    g = torch.Generator().manual_seed(0)
    params = vqfunc.init_params(cfg, generator=g)
    x = torch.randn(2, 6, 4, generator=g)
    mask = torch.rand(2, 6, generator=g) > 0.5
    _, out = vqfunc.quantize(params, x, cfg, mask=mask)
    _, out_kept = vqfunc.quantize(params, x[mask], cfg)
    state = vqfunc.init_state(params, cfg)
    masked = vqfunc.update_state(params, state, out, cfg, mask=mask)
    kept = vqfunc.update_state(params, state, out_kept, cfg)
    for a, b in zip((*masked[0], *masked[1]), (*kept[0], *kept[1]), strict=True):
        torch.testing.assert_close(a, b)


def test_statistics_of_separate_codebooks_are_per_group() -> None:
    cfg = vqfunc.VQConfig(feature_size=6, num_codes=8, groups=2, share=False, dim=-1, ema_decay=0.5)
    g = torch.Generator().manual_seed(0)
    params = vqfunc.init_params(cfg, generator=g)
    x = torch.randn(9, 6, generator=g)
    _, out = vqfunc.quantize(params, x, cfg)
    stats = vqfunc.ema_statistics(out.z, out.codes, cfg)
    for group in range(2):
        z = x[:, 3 * group : 3 * group + 3]
        for code in range(4):
            chosen = out.codes[:, group] == code
            assert stats.counts[group, code] == chosen.sum()
            torch.testing.assert_close(stats.sums[group, code], z[chosen].sum(0))


def test_shared_codebook_pools_the_groups() -> None:
    cfg = vqfunc.VQConfig(feature_size=6, num_codes=4, groups=3, dim=-1, ema_decay=0.5)
    g = torch.Generator().manual_seed(0)
    params = vqfunc.init_params(cfg, generator=g)
    x = torch.randn(5, 6, generator=g)
    _, out = vqfunc.quantize(params, x, cfg)
    stats = vqfunc.ema_statistics(out.z, out.codes, cfg)
    vectors, codes = x.reshape(-1, 2), out.codes.reshape(-1)
    for code in range(4):
        assert stats.counts[0, code] == (codes == code).sum()
        torch.testing.assert_close(stats.sums[0, code], vectors[codes == code].sum(0))


def test_cosine_averages_the_normalised_inputs() -> None:
    cfg = vqfunc.VQConfig(feature_size=3, num_codes=2, dim=-1, dist="cosine", ema_decay=0.5)
    codebook = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    params = vqfunc.init_params(cfg)._replace(codebook=codebook)
    x = torch.tensor([[10.0, 1.0, 0.0], [2.0, -1.0, 0.0]])  # both nearest to code 0
    _, out = vqfunc.quantize(params, x, cfg)
    new, _ = vqfunc.update_state(params, vqfunc.init_state(params, cfg), out, cfg)
    n = 0.5 * 1 + 0.5 * 2
    m = 0.5 * codebook[0] + 0.5 * F.normalize(x, dim=-1).sum(0)
    total = n + 0.5  # code 1 keeps half of its pseudo-observation
    smoothed = (n + cfg.ema_eps) / (total + 2 * cfg.ema_eps) * total
    torch.testing.assert_close(new.codebook[0], m / smoothed)


def test_affine_codebook_tracks_the_effective_averages() -> None:
    cfg = vqfunc.VQConfig(feature_size=2, num_codes=4, dim=-1, affine_lr=1.0, ema_decay=0.7)
    g = torch.Generator().manual_seed(0)
    params = vqfunc.init_params(cfg, generator=g, dtype=torch.float64)
    params = params._replace(
        affine_scale=torch.full((1, 2), 0.5, dtype=torch.float64),
        affine_bias=torch.tensor([[1.0, -2.0]], dtype=torch.float64),
    )
    state = vqfunc.init_state(params, cfg)
    torch.testing.assert_close(state.ema.sums[0], effective_codebook(params, cfg))
    x = torch.randn(20, 2, generator=g, dtype=torch.float64)
    _, out = vqfunc.quantize(params, x, cfg)
    new, state = vqfunc.update_state(params, state, out, cfg)
    counts = state.ema.counts[0]
    total = counts.sum()
    smoothed = (counts + cfg.ema_eps) / (total + 4 * cfg.ema_eps) * total
    torch.testing.assert_close(effective_codebook(new, cfg), state.ema.sums[0] / smoothed[:, None])


def test_ema_layer_moves_the_codebook_without_gradient() -> None:
    layer = vqfunc.VectorQuantize(4, 8, dim=-1, ema_decay=0.9)
    assert not layer.codebook.requires_grad
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    params = vqfunc.VQParams(*(p.detach().clone() for p in layer.params))
    state = optree.tree_map(torch.clone, layer.state)
    _, out = vqfunc.quantize(params, x, layer.cfg)
    expected, expected_state = vqfunc.update_state(params, state, out, layer.cfg)
    layer.eval()
    layer(x)
    assert torch.equal(layer.codebook, params.codebook)  # eval mode updates nothing
    layer.train()
    layer(x)
    torch.testing.assert_close(layer.codebook.detach(), expected.codebook)
    torch.testing.assert_close(layer.ema_counts, expected_state.ema.counts)


def test_update_is_refused_when_ema_is_off() -> None:
    cfg = vqfunc.VQConfig(feature_size=2, num_codes=2, dim=-1)
    params = vqfunc.init_params(cfg)
    state = vqfunc.init_ema_state(params, cfg)
    assert state.counts.shape == (1, 0)
    stats = vqfunc.EMAStatistics(torch.zeros(1, 2), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="ema_decay is 0"):
        vqfunc.ema_update(params, state, stats, cfg)


def test_update_state_vmaps_over_an_ensemble_like_a_loop() -> None:
    cfg = vqfunc.VQConfig(feature_size=4, num_codes=8, dim=-1, ema_decay=0.9, replace_freq=1)
    members = [
        vqfunc.init_params(cfg, generator=torch.Generator().manual_seed(i)) for i in range(3)
    ]
    states = [vqfunc.init_state(p, cfg) for p in members]
    draws = [
        vqfunc.draw_replace_randomness(10, cfg, generator=torch.Generator().manual_seed(i))
        for i in range(3)
    ]
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(9))

    def step(params, state, randomness):  # type: ignore[no-untyped-def]
        _, out = vqfunc.quantize(params, x, cfg)
        return vqfunc.update_state(params, state, out, cfg, randomness=randomness)

    stack = lambda records: optree.tree_map(lambda *t: torch.stack(t), *records)  # noqa: E731
    batched = torch.func.vmap(step)(stack(members), stack(states), stack(draws))
    for i in range(3):
        params, state = step(members[i], states[i], draws[i])
        torch.testing.assert_close(batched[0].codebook[i], params.codebook)
        leaves = zip(optree.tree_leaves(batched[1]), optree.tree_leaves(state), strict=True)
        for a, b in leaves:
            torch.testing.assert_close(a[i], b)
