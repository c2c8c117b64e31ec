"""EMA codebook updates for residual VQ against a level-by-level float64 reference."""

from __future__ import annotations

import pytest
import torch

import vqfunc
from vqfunc._affine import effective_codebook

RC = vqfunc.residual.ResidualConfig


def _reference_step(
    books: torch.Tensor,
    counts: torch.Tensor,
    sums: torch.Tensor,
    x: torch.Tensor,
    weights: torch.Tensor,
    cfg: vqfunc.residual.ResidualConfig,
    depth: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One EMA step in float64, written level by level with explicit loops over the rows.

    `books`, `counts`, `sums`: `[num_books, K, F]`, `[num_books, K]`, `[num_books, K, F]`.
    With `depth` `[N]`, row `i` counts only at levels below `depth[i]`, and a separate
    codebook that no row reached keeps its averages.
    """
    decay, eps = cfg.ema_decay, cfg.ema_eps
    num_books, k, f = books.shape
    n = torch.zeros(num_books, k, dtype=torch.float64)
    s = torch.zeros(num_books, k, f, dtype=torch.float64)
    residual = x.double().clone()
    for level in range(cfg.levels):
        b = 0 if cfg.share else level
        for row in range(x.shape[0]):
            code = int(((residual[row] - books[b]) ** 2).sum(-1).argmin())
            if depth is None or level < int(depth[row]):
                n[b, code] += weights[row]
                s[b, code] += weights[row] * residual[row]
            residual[row] = residual[row] - books[b, code]
    new_counts = decay * counts + (1 - decay) * n
    new_sums = decay * sums + (1 - decay) * s
    total = new_counts.sum(-1, keepdim=True)
    smoothed = (new_counts + eps) / (total + k * eps) * total
    new_books = new_sums / smoothed.unsqueeze(-1)
    if depth is not None and not cfg.share:
        ran = (torch.arange(cfg.levels) < depth.max()).view(-1, 1)
        new_counts = torch.where(ran, new_counts, counts)
        new_sums = torch.where(ran.unsqueeze(-1), new_sums, sums)
        new_books = torch.where(ran.unsqueeze(-1), new_books, books)
    return new_counts, new_sums, new_books


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_two_steps_match_the_level_by_level_reference(share: bool, masked: bool) -> None:
    cfg = RC(
        feature_size=3, num_codes=8 if share else 12, levels=3, share=share, dim=-1,
        ema_decay=0.7, ema_eps=1e-3,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    params = vqfunc.residual.init_params(cfg, generator=g, dtype=torch.float64)
    state = vqfunc.residual.init_state(params, cfg)
    k = cfg.codes_per_book
    books = params.codebook.reshape(cfg.num_books, k, 3).clone()
    counts = torch.ones(cfg.num_books, k, dtype=torch.float64)
    sums = books.clone()
    for _ in range(2):
        x = torch.randn(9, 3, generator=g, dtype=torch.float64) * 1.5
        mask = torch.rand(9, generator=g) > 0.3 if masked else None
        weights = torch.ones(9, dtype=torch.float64) if mask is None else mask.double()
        counts, sums, books = _reference_step(books, counts, sums, x, weights, cfg)
        _, out = vqfunc.residual.quantize(params, x, cfg, mask=mask)
        params, state = vqfunc.residual.update_state(params, state, out, cfg, mask=mask)
        torch.testing.assert_close(state.ema.counts, counts)
        torch.testing.assert_close(state.ema.sums, sums)
        torch.testing.assert_close(params.codebook.reshape(cfg.num_books, k, 3), books)


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("deepest", [2, 4])
def test_each_row_counts_only_at_the_levels_its_depth_reached(share: bool, deepest: int) -> None:
    # Quantizer dropout's per-row depth: a row adds to the statistics of its first `depth`
    # levels only; with `deepest < levels`, the last levels ran for no row and keep theirs.
    cfg = RC(
        feature_size=3, num_codes=8 if share else 16, levels=4, share=share, dim=-1,
        ema_decay=0.6, ema_eps=1e-3,
    )  # fmt: skip
    g = torch.Generator().manual_seed(5)
    params = vqfunc.residual.init_params(cfg, generator=g, dtype=torch.float64)
    state = vqfunc.residual.init_state(params, cfg)
    k = cfg.codes_per_book
    books = params.codebook.reshape(cfg.num_books, k, 3).clone()
    counts = torch.ones(cfg.num_books, k, dtype=torch.float64)
    sums = books.clone()
    x = torch.randn(11, 3, generator=g, dtype=torch.float64)
    depth = torch.randint(1, deepest + 1, (11,), generator=g)
    mask = torch.rand(11, generator=g) > 0.2
    counts, sums, books = _reference_step(books, counts, sums, x, mask.double(), cfg, depth)
    _, out = vqfunc.residual.quantize(params, x, cfg, mask=mask, depth=depth)
    params, state = vqfunc.residual.update_state(params, state, out, cfg, mask=mask)
    torch.testing.assert_close(state.ema.counts, counts)
    torch.testing.assert_close(state.ema.sums, sums)
    torch.testing.assert_close(params.codebook.reshape(cfg.num_books, k, 3), books)


def test_non_finite_rows_change_nothing() -> None:
    cfg = RC(feature_size=2, num_codes=4, levels=2, dim=-1, ema_decay=0.9)
    g = torch.Generator().manual_seed(1)
    params = vqfunc.residual.init_params(cfg, generator=g)
    state = vqfunc.residual.init_state(params, cfg)
    x = torch.randn(6, 2, generator=g)
    poisoned = torch.cat([x, torch.tensor([[float("nan"), 0.0], [float("inf"), 1.0]])])
    _, out = vqfunc.residual.quantize(params, x, cfg)
    _, out_bad = vqfunc.residual.quantize(params, poisoned, cfg)
    clean = vqfunc.residual.update_state(params, state, out, cfg)
    dirty = vqfunc.residual.update_state(params, state, out_bad, cfg)
    for a, b in zip((*clean[0], *clean[1].ema), (*dirty[0], *dirty[1].ema), strict=True):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b)


def test_affine_codebook_moves_its_effective_codes() -> None:
    cfg = RC(feature_size=2, num_codes=4, levels=2, dim=-1, ema_decay=0.5, affine_lr=3.0)
    g = torch.Generator().manual_seed(2)
    params = vqfunc.residual.init_params(cfg, generator=g)
    params = params._replace(
        affine_scale=torch.randn(params.affine_scale.shape, generator=g) * 0.1,
        affine_bias=torch.randn(params.affine_bias.shape, generator=g) * 0.1,
    )
    state = vqfunc.residual.init_state(params, cfg)
    x = torch.randn(10, 2, generator=g)
    _, out = vqfunc.residual.quantize(params, x, cfg)
    new_params, new_state = vqfunc.residual.update_state(params, state, out, cfg)
    # The averages live in the effective space: the effective codes are sums / smoothed sizes.
    counts = new_state.ema.counts[0]
    total = counts.sum()
    smoothed = (counts + cfg.ema_eps) / (total + 4 * cfg.ema_eps) * total
    expected = new_state.ema.sums[0] / smoothed.unsqueeze(-1)
    torch.testing.assert_close(effective_codebook(new_params, cfg), expected)


def test_ema_with_replacement_restarts_the_replaced_codes_statistics() -> None:
    cfg = RC(
        feature_size=2, num_codes=3, levels=2, dim=-1, ema_decay=0.9, replace_freq=1,
        replace_rho=0.0,
    )  # fmt: skip
    book = torch.tensor([[0.0, 0.0], [-50.0, -50.0], [1000.0, 1000.0]])
    params = vqfunc.residual.init_params(cfg)._replace(codebook=book)
    state = vqfunc.residual.init_state(params, cfg)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(3))
    _, out = vqfunc.residual.quantize(params, x, cfg)
    params, state = vqfunc.residual.update_state(
        params, state, out, cfg, generator=torch.Generator().manual_seed(4)
    )
    # Codes 1 and 2 were unused: they became batch vectors with one pseudo-observation.
    for j in (1, 2):
        assert (x - params.codebook[j]).norm(dim=-1).min() < 1e-5
        assert state.ema.counts[0, j] == 1.0


@pytest.mark.parametrize("share", [True, False])
def test_layer_trains_with_ema_and_matches_the_functional_step(share: bool) -> None:
    kw = {"share": share, "dim": -1, "ema_decay": 0.8}
    layer = vqfunc.ResidualVectorQuantize(
        3, 8, levels=2, generator=torch.Generator().manual_seed(0), **kw
    )
    assert not layer.codebook.requires_grad
    assert {"ema_counts", "ema_sums", "replace_counters"} <= set(layer.state_dict())
    assert "ema_decay=0.8" in repr(layer)
    params = vqfunc.VQParams(*(p.detach().clone() for p in layer.params))
    state = vqfunc.residual.init_state(params, layer.cfg)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        x = torch.randn(6, 3, generator=g)
        layer(x)
        _, out = vqfunc.residual.quantize(params, x, layer.cfg)
        params, state = vqfunc.residual.update_state(params, state, out, layer.cfg)
        assert torch.equal(layer.codebook, params.codebook)
        assert torch.equal(layer.ema_sums, state.ema.sums)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.eval()
    layer(torch.randn(6, 3, generator=g))
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_state_dict_without_ema_buffers_loads_with_fresh_statistics() -> None:
    old = vqfunc.ResidualVectorQuantize(3, 8, levels=2, dim=-1)
    saved = {k: v for k, v in old.state_dict().items() if not k.startswith("ema_")}
    layer = vqfunc.ResidualVectorQuantize(3, 8, levels=2, dim=-1, ema_decay=0.9)
    layer.load_state_dict(saved)
    assert torch.equal(layer.codebook, old.codebook)
    assert torch.equal(layer.ema_counts, torch.ones(1, 8))
    assert torch.equal(layer.ema_sums[0], old.codebook)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [("ema_decay", 1.0, r"ema_decay must be in \[0.0, 1.0\), got 1.0"),
     ("ema_decay", -0.1, "ema_decay must be in"),
     ("ema_eps", -1.0, "ema_eps must be a finite number >= 0, got -1.0")],
)  # fmt: skip
def test_bad_ema_settings_name_the_field(field: str, value: float, expected: str) -> None:
    with pytest.raises(ValueError, match=rf"ResidualConfig: {expected}"):
        RC(feature_size=2, num_codes=4, **{field: value})  # type: ignore[arg-type]
