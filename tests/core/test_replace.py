"""Dead-code replacement (vqtorch's LRU) against a step-by-step reference."""

from __future__ import annotations

import optree
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vqfunc
from vqfunc._affine import effective_codebook
from vqfunc._replace import ReplaceRandomness


def _setup(
    replace_freq: int = 3, **kw: object
) -> tuple[vqfunc.VQConfig, vqfunc.VQParams, torch.Tensor]:
    """Codes 0 and 1 sit on the data; codes 2 and 3 are far away and never used."""
    cfg = vqfunc.VQConfig(feature_size=2, num_codes=4, dim=-1, replace_freq=replace_freq, **kw)
    codebook = torch.tensor([[0.0, 0.0], [5.0, 5.0], [100.0, 0.0], [0.0, 100.0]])
    params = vqfunc.init_params(cfg)._replace(codebook=codebook)
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(6, 2, generator=g) * 0.1, 5 + torch.randn(6, 2, generator=g) * 0.1])
    return cfg, params, x


def _expected_candidates(
    z: torch.Tensor,
    valid: torch.Tensor,
    randomness: ReplaceRandomness,
    k: int,
    rho: float,
    book: int = 0,
) -> torch.Tensor:
    """Reference: valid vectors by decreasing key, cycled over the codes, plus scaled noise."""
    keys = randomness.keys[book].tolist()
    order = sorted((i for i in range(z.shape[0]) if bool(valid[i])), key=lambda i: -keys[i])
    order = order[: min(k, z.shape[0])]
    rows = []
    for j in range(k):
        v = z[order[j % len(order)]]
        rows.append(v + rho * v.norm() * randomness.noise[book, j])
    return torch.stack(rows)


def test_unused_code_is_replaced_after_replace_freq_steps_and_used_ones_never() -> None:
    cfg, params, x = _setup(replace_freq=3, replace_rho=0.05)
    state = vqfunc.init_state(params, cfg)
    g = torch.Generator().manual_seed(0)
    for step in range(1, 4):
        before = params.codebook.clone()
        _, out = vqfunc.quantize(params, x, cfg)
        randomness = vqfunc.draw_replace_randomness(x.shape[0], cfg, generator=g)
        params, state = vqfunc.update_state(params, state, out, cfg, randomness=randomness)
        assert torch.equal(params.codebook[:2], before[:2])  # used codes are never touched
        if step < 3:
            assert torch.equal(params.codebook, before)
            assert state.replace.counters.tolist() == [[3, 3, 3 - step, 3 - step]]
    expected = _expected_candidates(out.z, torch.ones(12, dtype=torch.bool), randomness, 4, 0.05)
    torch.testing.assert_close(params.codebook[2:], expected[2:])
    assert state.replace.counters.tolist() == [[3, 3, 3, 3]]


def test_code_used_every_step_survives_many_periods() -> None:
    cfg, params, x = _setup(replace_freq=1)
    state = vqfunc.init_state(params, cfg)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        _, out = vqfunc.quantize(params, x, cfg)
        params, state = vqfunc.update_state(params, state, out, cfg, generator=g)
        assert torch.equal(params.codebook[:2], torch.tensor([[0.0, 0.0], [5.0, 5.0]]))
    # With T = 1 the unused codes are replaced at every step, so they now lie near the data.
    assert params.codebook[2:].abs().max() < 10


def test_masked_rows_are_neither_use_nor_candidates() -> None:
    cfg, params, x = _setup(replace_freq=1, replace_rho=0.0)
    x = torch.cat([x, torch.tensor([[100.0, 0.1], [0.1, 100.0]])])  # would use codes 2 and 3
    mask = torch.ones(x.shape[0], dtype=torch.bool)
    mask[-2:] = False
    _, out = vqfunc.quantize(params, x, cfg, mask=mask)
    keys = torch.rand(1, x.shape[0], generator=torch.Generator().manual_seed(3))
    keys[0, -2:] = 2.0  # the masked rows have the largest keys, yet must not be drawn
    randomness = ReplaceRandomness(keys, torch.zeros(1, 4, 2))
    state = vqfunc.init_state(params, cfg)
    new, state = vqfunc.update_state(params, state, out, cfg, mask=mask, randomness=randomness)
    expected = _expected_candidates(out.z, mask, randomness, 4, 0.0)
    torch.testing.assert_close(new.codebook[2:], expected[2:])
    assert not (new.codebook[2:].abs() > 50).any()


def test_fully_masked_batch_replaces_nothing() -> None:
    cfg, params, x = _setup(replace_freq=1)
    _, out = vqfunc.quantize(params, x, cfg, mask=torch.zeros(x.shape[0]))
    state = vqfunc.init_state(params, cfg)
    new, state = vqfunc.update_state(params, state, out, cfg, mask=torch.zeros(x.shape[0]))
    assert torch.equal(new.codebook, params.codebook)
    assert state.replace.counters.tolist() == [[0, 0, 0, 0]]  # replaced at the next real batch


def test_empty_batch_replaces_nothing() -> None:
    cfg, params, _ = _setup(replace_freq=2)
    x = torch.zeros(0, 2)
    _, out = vqfunc.quantize(params, x, cfg)
    new, state = vqfunc.update_state(params, vqfunc.init_state(params, cfg), out, cfg)
    assert torch.equal(new.codebook, params.codebook)
    assert state.replace.counters.tolist() == [[1, 1, 1, 1]]


def test_fewer_vectors_than_codes_cycles_through_the_batch() -> None:
    cfg = vqfunc.VQConfig(feature_size=3, num_codes=8, dim=-1, replace_freq=1, replace_rho=0.0)
    params = vqfunc.init_params(cfg, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 3, generator=torch.Generator().manual_seed(1))
    _, out = vqfunc.quantize(params, x, cfg)
    new, _ = vqfunc.update_state(
        params, vqfunc.init_state(params, cfg), out, cfg, generator=torch.Generator()
    )
    unused = out.histogram[0] == 0
    for code in torch.nonzero(unused).flatten().tolist():
        assert torch.isclose(new.codebook[code], x, atol=1e-6).all(-1).any()


@pytest.mark.parametrize("share", [True, False])
def test_separate_or_shared_codebooks_with_affine_replace_by_the_candidate(share: bool) -> None:
    cfg = vqfunc.VQConfig(
        feature_size=4,
        num_codes=8,
        groups=2,
        share=share,
        dim=-1,
        affine_lr=1.0,
        replace_freq=1,
        replace_rho=0.1,
    )
    g = torch.Generator().manual_seed(0)
    params = vqfunc.init_params(cfg, generator=g)
    params = params._replace(
        codebook=params.codebook + 50.0,  # far from the data: all but the nearest are unused
        affine_scale=0.3 * torch.randn(params.affine_scale.shape, generator=g),
        affine_bias=torch.randn(params.affine_bias.shape, generator=g),
    )
    x = torch.randn(5, 4, generator=g)
    _, out = vqfunc.quantize(params, x, cfg)
    randomness = vqfunc.draw_replace_randomness(5, cfg, generator=g)
    candidates = vqfunc.sample_candidates(out.z, out.codes, cfg, randomness=randomness)
    new, state = vqfunc.replace_dead_codes(
        params, vqfunc.init_replace_state(params, cfg), out.histogram, candidates, cfg
    )
    used = (out.histogram > 0).reshape(cfg.codebook_shape[:-1])
    effective = effective_codebook(new, cfg)
    cand = candidates.vectors.reshape(cfg.codebook_shape)
    torch.testing.assert_close(effective[~used], cand[~used], rtol=1e-5, atol=1e-5)
    assert torch.equal(new.codebook[used], params.codebook[used])
    assert torch.equal(new.affine_scale, params.affine_scale)
    assert (state.counters == 1).all()
    # Each codebook draws from its own vectors: all groups when shared, its group otherwise.
    rows = x.reshape(5, 2, 2)
    for b in range(cfg.num_books):
        pool = rows.reshape(-1, 2) if share else rows[:, b]
        valid = torch.ones(pool.shape[0], dtype=torch.bool)
        expected = _expected_candidates(pool, valid, randomness, cfg.codes_per_book, 0.1, book=b)
        torch.testing.assert_close(candidates.vectors[b], expected)


def test_replace_is_pure_and_compiles_without_graph_breaks() -> None:
    cfg, params, x = _setup(replace_freq=2, ema_decay=0.9)
    state = vqfunc.init_state(params, cfg)
    snapshot = [t.clone() for t in (*params, *optree.tree_leaves(state))]
    _, out = vqfunc.quantize(params, x, cfg)
    randomness = vqfunc.draw_replace_randomness(x.shape[0], cfg, generator=torch.Generator())

    def step(params, state, out, randomness):  # type: ignore[no-untyped-def]
        return vqfunc.update_state(params, state, out, cfg, randomness=randomness)

    eager = step(params, state, out, randomness)
    compiled = torch.compile(step, backend="eager", fullgraph=True)(params, state, out, randomness)
    for a, b in zip(snapshot, (*params, *optree.tree_leaves(state)), strict=True):
        assert torch.equal(a, b)
    for a, b in zip((*eager[0], *eager[1]), (*compiled[0], *compiled[1]), strict=True):
        torch.testing.assert_close(a, b)


def test_bad_state_is_refused_with_the_expected_shape() -> None:
    cfg, params, x = _setup(replace_freq=2)
    _, out = vqfunc.quantize(params, x, cfg)
    state = vqfunc.init_state(params, cfg)
    bad = state._replace(
        replace=state.replace._replace(counters=torch.zeros(1, 5, dtype=torch.long))
    )
    with pytest.raises(ValueError, match=r"replace\.counters.*expects shape \(1, 4\)"):
        vqfunc.update_state(params, bad, out, cfg)


@settings(max_examples=25)
@given(
    groups=st.sampled_from([1, 2]),
    share=st.booleans(),
    dist=st.sampled_from(["euclidean", "cosine"]),
    affine=st.booleans(),
    ema=st.booleans(),
    period=st.integers(1, 3),
    rows=st.integers(0, 7),
    seed=st.integers(0, 2**16),
)
def test_update_invariants(
    groups: int,
    share: bool,
    dist: str,
    affine: bool,
    ema: bool,
    period: int,
    rows: int,
    seed: int,
) -> None:
    """Inputs unchanged, shapes kept, counters in [0, T], used codes never replaced."""
    cfg = vqfunc.VQConfig(
        feature_size=4,
        num_codes=6 if share else 6 * groups,
        groups=groups,
        share=share,
        dim=-1,
        dist=dist,  # type: ignore[arg-type]
        affine_lr=1.0 if affine else 0.0,
        replace_freq=period,
        ema_decay=0.5 if ema else 0.0,
    )
    g = torch.Generator().manual_seed(seed)
    params = vqfunc.init_params(cfg, generator=g)
    if affine:
        params = params._replace(affine_bias=torch.randn(params.affine_bias.shape, generator=g))
    x = torch.randn(rows, 4, generator=g)
    mask = torch.rand(rows, generator=g) > 0.3
    state = vqfunc.init_state(params, cfg)
    counters = torch.randint(0, period + 1, state.replace.counters.shape, generator=g)
    state = state._replace(replace=state.replace._replace(counters=counters))
    originals = (*params, *optree.tree_leaves(state))
    snapshot = [t.clone() for t in originals]
    for _ in range(2):
        _, out = vqfunc.quantize(params, x, cfg, mask=mask)
        new, new_state = vqfunc.update_state(params, state, out, cfg, mask=mask, generator=g)
        assert [t.shape for t in new] == [t.shape for t in params]
        assert [t.shape for t in optree.tree_leaves(new_state)] == [
            t.shape for t in optree.tree_leaves(state)
        ]
        counters = new_state.replace.counters
        assert ((counters >= 0) & (counters <= period)).all()
        assert (counters[out.histogram > 0] == period).all()
        used = (out.histogram > 0).reshape(cfg.codebook_shape[:-1])
        if not ema:  # with EMA every code is recomputed from its averages
            assert torch.equal(new.codebook[used], params.codebook[used])
        assert torch.isfinite(new.codebook).all()
        params, state = new, new_state
    for a, b in zip(originals, snapshot, strict=True):
        assert torch.equal(a, b)  # the inputs of the first step were not mutated
