"""Dead-code replacement for residual VQ against a step-by-step reference in float64."""

from __future__ import annotations

import optree
import pytest
import torch

import vqfunc
from vqfunc._affine import effective_codebook
from vqfunc._replace import ReplaceRandomness, draw_replace_randomness


def _reference_codes(
    codebook: torch.Tensor, x: torch.Tensor, cfg: vqfunc.residual.ResidualConfig
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Brute-force residual search in float64: per level, the searched residual and its code."""
    residual = x.double()
    searched, codes = [], []
    for level in range(cfg.levels):
        book = (codebook if cfg.share else codebook[level]).double()
        code = torch.cdist(residual, book).argmin(1)
        searched.append(residual)
        codes.append(code)
        residual = residual - book[code]
    return searched, codes


def _run_steps(
    cfg: vqfunc.residual.ResidualConfig,
    data: list[torch.Tensor],
    masks: list[torch.Tensor | None],
    seed: int = 0,
) -> None:
    """Run `vqfunc.residual.update_state` step by step, checking each step against the reference."""
    g = torch.Generator().manual_seed(seed)
    params = vqfunc.residual.init_params(cfg, generator=g)
    state = vqfunc.residual.init_state(params, cfg)
    k, period = cfg.codes_per_book, cfg.replace_freq
    counters = [[period] * k for _ in range(cfg.num_books)]
    replacements = 0
    for x, mask in zip(data, masks, strict=True):
        _, out = vqfunc.residual.quantize(params, x, cfg, mask=mask)
        randomness = draw_replace_randomness(x.shape[0], cfg, generator=g)
        old = effective_codebook(params, cfg).reshape(cfg.num_books, k, -1)
        searched, codes = _reference_codes(old[0] if cfg.share else old, x, cfg)
        valid = torch.ones(x.shape[0], dtype=torch.bool) if mask is None else mask.bool()
        # Which codes each codebook's unmasked rows used, and its candidate residuals.
        used: list[set[int]] = [set() for _ in range(cfg.num_books)]
        pools: list[list[torch.Tensor]] = [[] for _ in range(cfg.num_books)]
        for level in range(cfg.levels):
            book = 0 if cfg.share else level
            for row in range(x.shape[0]):
                if valid[row]:
                    used[book].add(int(codes[level][row]))
                    pools[book].append(searched[level][row])
        params, state = vqfunc.residual.update_state(
            params, state, out, cfg, mask=mask, randomness=randomness
        )
        new = effective_codebook(params, cfg).reshape(cfg.num_books, k, -1).double()
        for b in range(cfg.num_books):
            pool = torch.stack(pools[b]) if pools[b] else torch.zeros(0, new.shape[-1])
            for j in range(k):
                counters[b][j] = period if j in used[b] else counters[b][j] - 1
                if counters[b][j] > 0 or not pools[b]:
                    counters[b][j] = max(counters[b][j], 0)
                    assert torch.equal(new[b, j].float(), old[b, j].float()), (b, j)
                    continue
                counters[b][j] = period
                replacements += 1
                # The new code is a residual of the codebook's own rows plus rho*||v||*noise.
                noise = randomness.noise[b, j].double()
                expected = pool + cfg.replace_rho * pool.norm(dim=-1, keepdim=True) * noise
                gap = (expected - new[b, j]).norm(dim=-1).min()
                assert gap < 1e-4 * (1 + new[b, j].norm()), (b, j, float(gap))
        assert state.replace.counters.tolist() == counters
    assert replacements > 0  # the data exercised the replacement


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("affine_lr", [0.0, 2.0])
def test_steps_match_reference(share: bool, affine_lr: float) -> None:
    cfg = vqfunc.residual.ResidualConfig(
        feature_size=3,
        num_codes=12,
        levels=2,
        share=share,
        dim=-1,
        replace_freq=2,
        replace_rho=0.05,
        affine_lr=affine_lr,
    )
    g = torch.Generator().manual_seed(3)
    # Few rows per step: most codes go unused and get replaced along the way.
    data = [torch.randn(4, 3, generator=g) for _ in range(6)]
    masks: list[torch.Tensor | None] = [None, torch.tensor([1, 0, 1, 1]).bool()] * 3
    _run_steps(cfg, data, masks)


def _far_codebook_setup(share: bool) -> tuple[vqfunc.residual.ResidualConfig, vqfunc.VQParams]:
    """Code 0 of each codebook sits near the data, code 1 is near nothing, code 2 far away."""
    cfg = vqfunc.residual.ResidualConfig(
        feature_size=2, num_codes=3 if share else 6, levels=2, share=share, dim=-1,
        replace_freq=3, replace_rho=0.0,
    )  # fmt: skip
    book = torch.tensor([[0.0, 0.0], [-50.0, -50.0], [1000.0, 1000.0]])
    codebook = book if share else torch.stack([book, book])
    return cfg, vqfunc.residual.init_params(cfg)._replace(codebook=codebook)


@pytest.mark.parametrize("share", [True, False])
def test_unused_code_replaced_after_period_used_never(share: bool) -> None:
    cfg, params = _far_codebook_setup(share)
    state = vqfunc.residual.init_state(params, cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 2, generator=g)
    for step in range(1, 7):
        _, out = vqfunc.residual.quantize(params, x, cfg)
        params, state = vqfunc.residual.update_state(params, state, out, cfg, generator=g)
        books = params.codebook.reshape(cfg.num_books, 3, 2)
        # Code 0 is picked at every level every step: never replaced.
        assert torch.equal(books[:, 0], torch.zeros(cfg.num_books, 2))
        if step < 3:
            assert torch.equal(books[:, 2], torch.full((cfg.num_books, 2), 1000.0))
    # Codes 1 and 2 were dead for 3 steps: replaced by residual vectors (rho = 0), which are
    # the input rows (level 1) or the input rows again (level 2 searched x - 0 = x).
    for b in range(cfg.num_books):
        for j in (1, 2):
            assert (x - books[b, j]).norm(dim=-1).min() < 1e-6


def test_separate_codebooks_take_their_own_levels_residuals() -> None:
    cfg = vqfunc.residual.ResidualConfig(
        feature_size=2, num_codes=4, levels=2, share=False, dim=-1, replace_freq=1,
        replace_rho=0.0,
    )  # fmt: skip
    # Level 1's code 0 sits at the data (rows near 10), so level 2 sees residuals near 0.
    codebook = torch.tensor([[[10.0, 10.0], [-99.0, 0.0]], [[0.0, 0.0], [0.0, -99.0]]])
    params = vqfunc.residual.init_params(cfg)._replace(codebook=codebook)
    g = torch.Generator().manual_seed(1)
    x = 10 + 0.1 * torch.randn(6, 2, generator=g)
    _, out = vqfunc.residual.quantize(params, x, cfg)
    state = vqfunc.residual.init_state(params, cfg)
    params, _ = vqfunc.residual.update_state(params, state, out, cfg, generator=g)
    assert (x - params.codebook[0, 1]).norm(dim=-1).min() < 1e-6
    assert (x - 10 - params.codebook[1, 1]).norm(dim=-1).min() < 1e-6


def test_shared_codebook_counts_a_use_at_any_level_and_pools_levels() -> None:
    cfg = vqfunc.residual.ResidualConfig(
        feature_size=2, num_codes=3, levels=2, share=True, dim=-1, replace_freq=1,
        replace_rho=0.0,
    )  # fmt: skip
    # Code 0 is used only by level 1, code 1 only by level 2; code 2 by no level.
    codebook = torch.tensor([[10.0, 10.0], [0.5, 0.5], [-500.0, 0.0]])
    params = vqfunc.residual.init_params(cfg)._replace(codebook=codebook)
    x = torch.tensor([[10.5, 10.5], [10.6, 10.4]])
    _, out = vqfunc.residual.quantize(params, x, cfg)
    assert out.codes.tolist() == [[0, 1], [0, 1]]
    state = vqfunc.residual.init_state(params, cfg)
    for seed in range(8):
        new, state2 = vqfunc.residual.update_state(
            params, state, out, cfg, generator=torch.Generator().manual_seed(seed)
        )
        assert torch.equal(new.codebook[:2], codebook[:2])
        pool = torch.cat([x, x - codebook[0]])  # residuals searched by levels 1 and 2
        assert (pool - new.codebook[2]).norm(dim=-1).min() < 1e-6
        assert state2.replace.counters.tolist() == [[1, 1, 1]]


def test_masked_rows_neither_use_nor_become_candidates() -> None:
    cfg, params = _far_codebook_setup(share=True)
    cfg = cfg.replace(replace_freq=1)
    x = torch.tensor([[0.1, 0.0], [-50.0, -50.0], [-49.0, -50.0]])
    mask = torch.tensor([True, False, False])
    _, out = vqfunc.residual.quantize(params, x, cfg, mask=mask)
    state = vqfunc.residual.init_state(params, cfg)
    for seed in range(5):
        new, _ = vqfunc.residual.update_state(
            params, state, out, cfg, mask=mask, generator=torch.Generator().manual_seed(seed)
        )
        # Code 1 was picked by masked rows only: it is dead and replaced by the unmasked
        # row's residuals (x[0] at level 1, x[0] - code 0 at level 2).
        allowed = torch.stack([x[0], x[0] - params.codebook[0]])
        for j in (1, 2):
            assert (allowed - new.codebook[j]).norm(dim=-1).min() < 1e-6


def test_off_returns_inputs_and_bad_state_raises() -> None:
    cfg = vqfunc.residual.ResidualConfig(feature_size=2, num_codes=4, levels=2, dim=-1)
    params = vqfunc.residual.init_params(cfg)
    state = vqfunc.residual.init_state(params, cfg)
    assert state.replace.counters.shape == (1, 0)
    _, out = vqfunc.residual.quantize(params, torch.randn(3, 2), cfg)
    new, new_state = vqfunc.residual.update_state(params, state, out, cfg)
    assert new is params and new_state is state
    on = cfg.replace(replace_freq=2)
    with pytest.raises(ValueError, match=r"state\.replace\.counters is \(1, 0\).*\(1, 4\)"):
        vqfunc.residual.update_state(params, state, out, on)
    with pytest.raises(TypeError, match="state must be a ResidualState"):
        vqfunc.residual.update_state(params, (state.replace.counters,), out, on)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ResidualConfig: replace_freq must be an int >= 0"):
        vqfunc.residual.ResidualConfig(feature_size=2, num_codes=4, replace_freq=-1)
    with pytest.raises(
        ValueError, match="ResidualConfig: replace_rho must be a finite number >= 0"
    ):
        vqfunc.residual.ResidualConfig(feature_size=2, num_codes=4, replace_rho=-1.0)


class _RecordingSync:
    """A one-rank stand-in for `ProcessGroupSync` that records the collectives asked for."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def reduce_sum(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.calls.append("reduce_sum")
        return tensors

    def share_candidates(self, candidates: vqfunc.Candidates) -> vqfunc.Candidates:
        self.calls.append("share_candidates")
        return candidates


def test_sync_reduces_histogram_and_shares_candidates() -> None:
    cfg, params = _far_codebook_setup(share=False)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(2))
    _, out = vqfunc.residual.quantize(params, x, cfg)
    state = vqfunc.residual.init_state(params, cfg)
    randomness: ReplaceRandomness = draw_replace_randomness(5, cfg)
    sync = _RecordingSync()
    a = vqfunc.residual.update_state(params, state, out, cfg, randomness=randomness, sync=sync)
    b = vqfunc.residual.update_state(params, state, out, cfg, randomness=randomness)
    assert sync.calls == ["reduce_sum", "share_candidates"]
    leaves = zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True)
    assert all(torch.equal(p, q) for p, q in leaves)


def _layer(**kw: object) -> vqfunc.ResidualVectorQuantize:
    return vqfunc.ResidualVectorQuantize(
        feature_size=3, num_codes=8, groups=2, dim=-1, replace_freq=2,
        generator=torch.Generator().manual_seed(0), **kw,  # type: ignore[arg-type]
    )  # fmt: skip


@pytest.mark.parametrize("share", [True, False])
def test_layer_matches_functional_steps_and_only_trains(share: bool) -> None:
    layer = _layer(share=share)
    params = vqfunc.VQParams(*(p.detach().clone() for p in layer.params))
    state = vqfunc.residual.init_state(params, layer.cfg)
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(3, 3, generator=g) for _ in range(5)]
    for x in batches:
        torch.manual_seed(11)
        _, misc = layer(x)
        _, out = vqfunc.residual.quantize(params, x, layer.cfg)
        torch.manual_seed(11)
        params, state = vqfunc.residual.update_state(params, state, out, layer.cfg)
        assert torch.equal(misc["codes"], out.codes)
        assert torch.equal(layer.codebook, params.codebook)
        assert torch.equal(layer.replace_counters, state.replace.counters)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.eval()
    layer(torch.randn(3, 3, generator=g))
    layer.train()
    own = {k: v.clone() for k, v in layer.params._asdict().items()}
    torch.func.functional_call(layer, own, (torch.randn(3, 3, generator=g),))
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_state_dict_round_trip_continues_identically() -> None:
    g = torch.Generator().manual_seed(7)
    batches = [torch.randn(3, 3, generator=g) for _ in range(6)]
    first = _layer(share=True)
    for x in batches[:3]:
        first(x)
    second = _layer(share=True, replace_rho=1e-2)
    with torch.no_grad():
        second.codebook.normal_()  # differs until the state is loaded
    second.load_state_dict(first.state_dict())
    assert torch.equal(second.replace_counters, first.replace_counters)
    for step, x in enumerate(batches[3:]):
        torch.manual_seed(step)
        za, _ = first(x)
        torch.manual_seed(step)
        zb, _ = second(x)
        assert torch.equal(za, zb)
        assert torch.equal(first.codebook, second.codebook)
        assert torch.equal(first.replace_counters, second.replace_counters)
    assert "replace_freq=2" in repr(first)


def test_state_dict_without_counters_loads_with_fresh_counters() -> None:
    trained = _layer(share=False)
    for x in torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(3)):
        trained(x)
    old_format = {k: v for k, v in trained.state_dict().items() if k != "replace_counters"}
    fresh = _layer(share=False)
    fresh.load_state_dict(old_format)
    assert torch.equal(fresh.codebook, trained.codebook)
    assert torch.equal(fresh.replace_counters, torch.full((2, 4), 2))
