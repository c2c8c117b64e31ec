"""The usage rule of dead-code replacement (EnCodec's count, Mimi's ratio) against a float64
step-by-step reference written from the formulas."""

from __future__ import annotations

from typing import Any

import optree
import pytest
import torch
from support.dynamo import assert_one_graph

import vqfunc
from vqfunc._affine import effective_codebook
from vqfunc._replace_usage import dead_by_usage, usage_update

RC = vqfunc.residual.ResidualConfig


def _reference_usage_step(
    usage: list[list[float]],
    counts: list[list[float]],
    threshold: float,
    kind: str,
    decay: float,
) -> tuple[list[list[bool]], list[list[float]]]:
    """Dead codes and new averages, code by code in Python floats (float64)."""
    dead_all, new_all = [], []
    for u, n in zip(usage, counts, strict=True):
        mean = sum(u) / len(u)
        limit = threshold * mean if kind == "ratio" else threshold
        dead = [value < limit for value in u]
        new = [decay * a + (1 - decay) * b for a, b in zip(u, n, strict=True)]
        restart = sum(new) / len(new)
        dead_all.append(dead)
        new_all.append([restart if d else v for d, v in zip(dead, new, strict=True)])
    return dead_all, new_all


@pytest.mark.parametrize(("kind", "threshold"), [("count", 1.5), ("ratio", 0.5)])
@pytest.mark.parametrize("share", [True, False])
def test_steps_match_the_float64_reference(kind: str, threshold: float, share: bool) -> None:
    cfg = vqfunc.VQConfig(
        feature_size=4, num_codes=12, groups=2, share=share, dim=-1, replace_rule="usage",
        replace_threshold=threshold, replace_usage=kind, replace_decay=0.6, replace_rho=0.0,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    params = vqfunc.init_params(cfg, generator=g)
    state = vqfunc.init_state(params, cfg)
    k = cfg.codes_per_book
    usage = [[1.5 if kind == "count" else 1.0] * k for _ in range(cfg.num_books)]
    assert state.replace.usage.tolist() == usage
    assert state.replace.counters.shape == (cfg.num_books, 0)
    replaced_total = 0
    for step in range(6):
        x = torch.randn(5, 4, generator=g) + (3.0 if step % 2 else 0.0)
        mask = torch.tensor([True, True, False, True, True]) if step % 3 == 1 else None
        _, out = vqfunc.quantize(params, x, cfg, mask=mask)
        counts = out.histogram.double().tolist()
        dead, usage = _reference_usage_step(usage, counts, threshold, kind, cfg.replace_decay)
        old = effective_codebook(params, cfg).reshape(cfg.num_books, k, 2)
        params, state = vqfunc.update_state(params, state, out, cfg, mask=mask, generator=g)
        new = effective_codebook(params, cfg).reshape(cfg.num_books, k, 2)
        torch.testing.assert_close(
            state.replace.usage.double(), torch.tensor(usage, dtype=torch.float64), rtol=1e-6,
            atol=1e-6,
        )  # fmt: skip
        rows = x.reshape(5, 2, 2) if mask is None else x[mask].reshape(-1, 2, 2)
        for b in range(cfg.num_books):
            pool = rows.reshape(-1, 2) if share else rows[:, b]
            for j in range(k):
                if dead[b][j]:
                    replaced_total += 1
                    # rho = 0: the new code is one of the codebook's own unmasked vectors.
                    assert (pool - new[b, j]).norm(dim=-1).min() < 1e-6, (step, b, j)
                else:
                    assert torch.equal(new[b, j], old[b, j]), (step, b, j)
    assert replaced_total > 0


def test_ratio_rule_does_not_depend_on_the_batch_size_and_count_rule_does() -> None:
    g = torch.Generator().manual_seed(1)
    usage = torch.rand(2, 10, generator=g) * 4
    histogram = torch.randint(0, 6, (2, 10), generator=g).float()
    valid = torch.ones(2, 10, dtype=torch.bool)
    ratio = RC(feature_size=2, num_codes=10, replace_rule="usage", replace_threshold=0.7)
    count = ratio.replace(replace_usage="count", replace_threshold=2.0)
    for scale in (0.5, 3.0):
        # A batch `scale` times as large scales every average alike, in the long run.
        dead, new = usage_update(usage, histogram, valid, ratio)
        dead_s, new_s = usage_update(usage * scale, histogram * scale, valid, ratio)
        assert torch.equal(dead, dead_s)
        torch.testing.assert_close(new_s, new * scale)
        assert not torch.equal(dead_by_usage(usage, count), dead_by_usage(usage * scale, count))


def test_codes_without_a_candidate_keep_their_values_and_averages_decay() -> None:
    cfg = vqfunc.VQConfig(
        feature_size=2, num_codes=4, dim=-1, replace_rule="usage", replace_threshold=0.9
    )
    params = vqfunc.init_params(cfg, generator=torch.Generator().manual_seed(2))
    state = vqfunc.init_state(params, cfg)
    state = state._replace(replace=state.replace._replace(usage=torch.tensor([[4.0, 0, 0, 0]])))
    x = torch.randn(3, 2)
    _, out = vqfunc.quantize(params, x, cfg, mask=torch.zeros(3, dtype=torch.bool))
    new_params, new_state = vqfunc.update_state(
        params, state, out, cfg, mask=torch.zeros(3, dtype=torch.bool)
    )
    assert torch.equal(new_params.codebook, params.codebook)  # nothing to draw from
    torch.testing.assert_close(new_state.replace.usage, state.replace.usage * 0.99)


def test_non_finite_rows_neither_count_nor_become_codes() -> None:
    cfg = vqfunc.VQConfig(
        feature_size=2, num_codes=4, dim=-1, replace_rule="usage", replace_threshold=0.9,
        replace_rho=0.0, replace_decay=0.5,
    )  # fmt: skip
    codebook = torch.tensor([[0.0, 0.0], [50.0, 50.0], [-50.0, 50.0], [50.0, -50.0]])
    params = vqfunc.init_params(cfg)._replace(codebook=codebook)
    state = vqfunc.init_state(params, cfg)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(3))
    bad = torch.cat([x, torch.tensor([[float("nan"), 1.0], [float("inf"), 0.0]])])
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        _, out = vqfunc.quantize(params, bad, cfg)
        params, state = vqfunc.update_state(params, state, out, cfg, generator=g)
        assert torch.isfinite(state.replace.usage).all()
        assert torch.isfinite(params.codebook).all()
    # Codes 1 to 3 were never used: replaced by finite vectors of the batch.
    for j in (1, 2, 3):
        assert (x - params.codebook[j]).norm(dim=-1).min() < 1e-6


@pytest.mark.parametrize("share", [True, False])
def test_residual_usage_rule_draws_from_the_levels_residuals(share: bool) -> None:
    cfg = RC(
        feature_size=2, num_codes=3 if share else 6, levels=2, share=share, dim=-1,
        replace_rule="usage", replace_threshold=0.5, replace_decay=0.0, replace_rho=0.0,
        ema_decay=0.9,
    )  # fmt: skip
    book = torch.tensor([[0.0, 0.0], [-50.0, -50.0], [1000.0, 1000.0]])
    codebook = book if share else torch.stack([book, book])
    params = vqfunc.residual.init_params(cfg)._replace(codebook=codebook)
    state = vqfunc.residual.init_state(params, cfg)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(6)
    for _ in range(2):  # decay 0: after one batch the averages are its counts
        _, out = vqfunc.residual.quantize(params, x, cfg)
        params, state = vqfunc.residual.update_state(params, state, out, cfg, generator=g)
    books = params.codebook.reshape(cfg.num_books, 3, 2)
    searched = out.residuals[:, :2]  # [8, levels, 2]: what each level searched
    for b in range(cfg.num_books):
        pool = searched.reshape(-1, 2) if share else searched[:, b]
        for j in (1, 2):
            assert (pool - books[b, j]).norm(dim=-1).min() < 1e-5
        assert state.ema.counts[b, 1] == 1.0  # its EMA statistics restarted too


@pytest.mark.slow
def test_usage_step_is_pure_and_compiles_without_graph_breaks() -> None:
    cfg = vqfunc.VQConfig(
        feature_size=2, num_codes=4, dim=-1, replace_rule="usage", replace_threshold=0.8,
        ema_decay=0.9,
    )  # fmt: skip
    params = vqfunc.init_params(cfg, generator=torch.Generator().manual_seed(7))
    state = vqfunc.init_state(params, cfg)
    state = state._replace(replace=state.replace._replace(usage=torch.tensor([[3.0, 0, 2, 0]])))
    x = torch.randn(9, 2)
    _, out = vqfunc.quantize(params, x, cfg)
    randomness = vqfunc.draw_replace_randomness(9, cfg, generator=torch.Generator())
    snapshot = [t.clone() for t in (*params, *optree.tree_leaves(state))]

    def step(params, state, out, randomness):  # type: ignore[no-untyped-def]
        return vqfunc.update_state(params, state, out, cfg, randomness=randomness)

    eager = step(params, state, out, randomness)
    compiled = torch.compile(step, backend="eager", fullgraph=True)(params, state, out, randomness)
    for a, b in zip(snapshot, (*params, *optree.tree_leaves(state)), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(eager[0].codebook, params.codebook)  # codes 1 and 3 were replaced
    for a, b in zip(optree.tree_leaves(eager), optree.tree_leaves(compiled), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("layer", [vqfunc.VectorQuantize, vqfunc.ResidualVectorQuantize])
def test_layers_run_the_rule_and_load_state_dicts_without_usage(layer: type) -> None:
    kw = {
        "dim": -1, "replace_rule": "usage", "replace_threshold": 0.5, "replace_rho": 0.0,
        "replace_decay": 0.5,
    }  # fmt: skip
    trained = layer(2, 8, generator=torch.Generator().manual_seed(8), **kw)
    assert "replace_rule='usage'" in repr(trained)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(9)) * 0.1
    for _ in range(10):
        trained(x)
    assert (trained.replace_usage != 1.0).any()
    # Codes the small batch never reaches became its vectors.
    far = (trained.codebook.reshape(-1, 2)[:, None] - x).norm(dim=-1).min(-1).values
    assert (far < 1e-6).any()
    old_format = {k: v for k, v in trained.state_dict().items() if k != "replace_usage"}
    fresh = layer(2, 8, **kw)
    fresh.load_state_dict(old_format)
    assert torch.equal(fresh.codebook, trained.codebook)
    assert torch.equal(fresh.replace_usage, torch.ones_like(trained.replace_usage))


@pytest.mark.parametrize(
    ("options", "expected"),
    [({"replace_rule": "fifo"}, r"replace_rule must be one of \('lru', 'usage'\), got 'fifo'"),
     ({"replace_usage": "mean"}, r"replace_usage must be one of \('count', 'ratio'\)"),
     ({"replace_threshold": 0.5}, r"replace_threshold=0.5 belongs to replace_rule='usage'"),
     ({"replace_rule": "usage", "replace_freq": 3}, r"replace_freq=3 is the period of "),
     ({"replace_rule": "usage", "replace_threshold": 2.0},
      r"with replace_usage='ratio', replace_threshold is a fraction"),
     ({"replace_rule": "usage", "replace_threshold": -1.0}, r"replace_threshold must be a "),
     ({"replace_decay": 1.0}, r"replace_decay must be in \[0.0, 1.0\), got 1.0")],
)  # fmt: skip
@pytest.mark.parametrize("config", [vqfunc.VQConfig, RC])
def test_bad_rule_settings_name_the_field(
    config: type, options: dict[str, object], expected: str
) -> None:
    with pytest.raises(ValueError, match=rf"{config.__name__}: {expected}"):
        config(feature_size=2, num_codes=4, **options)


@pytest.mark.slow
def test_residual_step_with_ema_and_usage_compiles_once_for_every_step(
    dynamo_counters: Any,
) -> None:
    cfg = RC(
        feature_size=3, num_codes=12, levels=2, share=False, dim=-1, ema_decay=0.9,
        replace_rule="usage", replace_threshold=0.5, replace_decay=0.5,
    )  # fmt: skip
    g = torch.Generator().manual_seed(10)
    params = vqfunc.residual.init_params(cfg, generator=g)
    state = vqfunc.residual.init_state(params, cfg)
    eager_params, eager_state = params, state

    def step(params, state, x, randomness):  # type: ignore[no-untyped-def]
        _, out = vqfunc.residual.quantize(params, x, cfg)
        return vqfunc.residual.update_state(params, state, out, cfg, randomness=randomness)

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    for _ in range(4):  # error_on_recompile: the same graph serves every step
        x = torch.randn(10, 3, generator=g)
        randomness = vqfunc.draw_replace_randomness(10, cfg, generator=g)
        params, state = compiled(params, state, x, randomness)
        eager_params, eager_state = step(eager_params, eager_state, x, randomness)
        for a, b in zip(
            optree.tree_leaves((params, state)), optree.tree_leaves((eager_params, eager_state)),
            strict=True,
        ):  # fmt: skip
            torch.testing.assert_close(a, b)
    assert_one_graph(dynamo_counters)
