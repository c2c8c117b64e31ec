"""Consistent codebooks under torch.distributed: 2 processes, gloo backend, CPU.

Each multi-process test launches `tests/support/dist_worker.py` twice (one process per rank) with a
file store in `tmp_path`, and fails instead of hanging when the ranks do not finish within the
timeout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from support import ranks

import vqfunc
from vqfunc import distributed as vqdist
from vqfunc._ema import EMAState, EMAStatistics, ema_update
from vqfunc._replace import Candidates
from vqfunc._state import init_state, update_state

WORKER = Path(__file__).resolve().parents[1] / "support" / "dist_worker.py"
WORLD = 2
TIMEOUT_S = 120

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)


def launch(scenario: str, out: Path) -> None:
    """Run `scenario` on WORLD ranks, writing to `out`; a test failure, never a hang."""
    store = f"file://{out / f'store_{scenario}'}"
    ranks.launch(
        WORKER,
        lambda rank: (scenario, str(rank), str(WORLD), store, str(out)),
        world=WORLD,
        timeout_s=TIMEOUT_S,
        what=scenario,
    )


def results(out: Path, name: str) -> list[dict[str, Any]]:
    return [torch.load(out / f"{name}_rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def assert_trees_equal(a: Any, b: Any, what: str) -> None:
    """Bit-identical tensors in two trees of dicts, tuples and tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, what
        assert torch.equal(a, b), f"{what}: differs (max |diff| {(a - b).abs().max()})"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for key in a:
            assert_trees_equal(a[key], b[key], f"{what}.{key}")
    else:
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_trees_equal(x, y, f"{what}[{i}]")


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 2-rank launch of the `train` and `empty` scenarios (see dist_worker.py)."""
    out = tmp_path_factory.mktemp("dist")
    launch("main", out)
    return out


@pytest.fixture(scope="module")
def trained(launched: Path) -> tuple[Path, list[dict[str, Any]]]:
    return launched, results(launched, "train")


@pytest.mark.slow
def test_ddp_training_keeps_codebooks_and_state_bit_identical(
    trained: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, (rank0, rank1) = trained
    assert_trees_equal(rank0, rank1, "state_dict")
    # The run exercised every update: k-means ran, EMA and replacement moved the state.
    for name in ("vq", "vq2", "rvq"):
        assert bool(rank0[f"{name}.kmeans_initialized"])
    assert not torch.equal(rank0["vq.ema_counts"], torch.ones_like(rank0["vq.ema_counts"]))


@pytest.mark.slow
def test_without_the_collectives_the_ranks_diverge(
    trained: tuple[Path, list[dict[str, Any]]],
) -> None:
    # The control run proves that the identity above is the library's doing, not DDP's.
    out, _ = trained
    control = [torch.load(out / f"control_rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert not torch.equal(control[0]["vq.codebook"], control[1]["vq.codebook"])
    assert not torch.equal(control[0]["vq.ema_counts"], control[1]["vq.ema_counts"])


@pytest.mark.slow
def test_checkpoint_resumed_in_fresh_processes_continues_identically(
    trained: tuple[Path, list[dict[str, Any]]],
) -> None:
    out, uninterrupted = trained
    launch("resume", out)
    resumed = results(out, "resume")
    for rank in range(WORLD):
        assert_trees_equal(resumed[rank], uninterrupted[rank], f"rank {rank}")


@pytest.mark.slow
def test_usage_restarts_agree_across_ranks_with_different_data(tmp_path: Path) -> None:
    launch("usage", tmp_path)
    synced, control, initial = (
        results(tmp_path, name) for name in ("usage", "usage_control", "usage_initial")
    )
    assert_trees_equal(synced[0], synced[1], "usage state_dict")
    for name in ("vq", "rvq"):
        # The rule ran (its averages moved) and the codebooks were trained.
        usage = synced[0][f"{name}.replace_usage"]
        assert usage.numel() > 0 and not torch.equal(usage, torch.ones_like(usage))
        assert not torch.equal(synced[0][f"{name}.codebook"], initial[0][f"{name}.codebook"])
        # Without the collectives the ranks' usage and codebooks part ways.
        assert not torch.equal(
            control[0][f"{name}.replace_usage"], control[1][f"{name}.replace_usage"]
        )
        assert not torch.equal(control[0][f"{name}.codebook"], control[1][f"{name}.codebook"])


@pytest.fixture(scope="module")
def one_rank_empty(launched: Path) -> list[dict[str, Any]]:
    return results(launched, "empty")


@pytest.mark.slow
def test_a_rank_with_empty_or_masked_batches_does_not_hang(
    one_rank_empty: list[dict[str, Any]],
) -> None:
    rank0, rank1 = one_rank_empty
    assert_trees_equal(rank0["layer"], rank1["layer"], "layer state_dict")
    assert bool(rank0["layer"]["vq.kmeans_initialized"])
    for case in ("one_empty", "both"):
        assert_trees_equal(rank0[case]["warm"], rank1[case]["warm"], f"{case} warm-up")
        assert_trees_equal(rank0[case]["synced"], rank1[case]["synced"], f"{case} update")
        # Warm-up: the first rank's generator on every rank's data, in rank order.
        assert torch.equal(rank0[case]["warm"], rank0[case]["warm_ref"])
    # codebook_warmup with unequal loaders and per-rank generators: one codebook, fitted.
    (before, warmed0), (_, warmed1) = rank0["codebook_warmup"], rank1["codebook_warmup"]
    assert torch.equal(warmed0, warmed1) and not torch.equal(warmed0, before)
    # A NaN row on rank 1 is left out of the warm-up: the ranks agree on the finite rows' fit.
    (warm0, ref0), (warm1, _) = rank0["nan_row_warmup"], rank1["nan_row_warmup"]
    assert torch.equal(warm0, warm1) and torch.equal(warm0, ref0) and warm0.isfinite().all()
    # Non-finite rows given to the collective fit on rank 1, then a fit failing on rank 0:
    # every rank raises, none hangs.
    assert rank0["errors"][0] == rank1["errors"][0]
    assert "non-finite" in rank0["errors"][0] and "rank 1: 1" in rank0["errors"][0]
    assert rank0["errors"][1] == "ArithmeticError: fit failed"
    assert rank1["errors"][1].startswith("RuntimeError: warmup_params: fitting the codebook failed")
    # With rank 1 empty, the synced step is rank 0's purely local step, exactly.
    one = rank0["one_empty"]
    assert_trees_equal(one["synced"], one["local"], "one_empty vs local")


@pytest.mark.slow
def test_synced_update_sums_statistics_and_picks_candidates_by_rank(
    one_rank_empty: list[dict[str, Any]],
) -> None:
    results = [r["both"] for r in one_rank_empty]
    cfg = vqfunc.VQConfig(feature_size=4, num_codes=6, dim=-1, replace_freq=1, ema_decay=0.5)
    params = results[0]["params0"]
    state = results[0]["state0"]
    # EMA from the statistics summed over the ranks (in float64).
    counts = sum(r["stats"].counts.double() for r in results)
    sums = sum(r["stats"].sums.double() for r in results)
    decay = cfg.ema_decay
    expected_counts = decay * state.ema.counts.double() + (1 - decay) * counts
    expected_sums = decay * state.ema.sums.double() + (1 - decay) * sums
    params_ema, _ = ema_update(
        params, EMAState(state.ema.counts, state.ema.sums), EMAStatistics(counts, sums), cfg
    )
    synced_params, synced_state = results[0]["synced"]
    used = sum(r["histogram"] for r in results) > 0
    replaced = ~used  # replace_freq=1: every code unused on all ranks is replaced
    assert replaced.any() and used.any()
    torch.testing.assert_close(
        synced_state.ema.counts[used].double(), expected_counts[used], rtol=1e-6, atol=1e-6
    )
    torch.testing.assert_close(
        synced_state.ema.sums[used].double(), expected_sums[used], rtol=1e-6, atol=1e-6
    )
    codes = synced_params.codebook
    torch.testing.assert_close(codes[used[0]], params_ema.codebook[used[0]], rtol=1e-5, atol=1e-6)
    # A replaced code k takes the candidate of rank k mod 2 (both ranks hold vectors).
    for k in torch.nonzero(replaced[0]).flatten().tolist():
        owner = results[k % WORLD]["candidates"]
        assert torch.equal(codes[k], owner.vectors[0, k])
    assert synced_state.replace.counters.eq(cfg.replace_freq).all()


class _FakeGather(vqdist.ProcessGroupSync):
    """`share_candidates` against a pre-gathered tensor, to test the selection rule alone."""

    def __init__(self, gathered: torch.Tensor) -> None:
        self.world_size = gathered.shape[0]
        self.gathered = gathered

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return self.gathered


def test_share_candidates_takes_the_next_rank_with_a_valid_candidate() -> None:
    world, books, k, d = 3, 2, 5, 2
    vectors = torch.randn(world, books, k, d, generator=torch.Generator().manual_seed(0))
    valid = torch.rand(world, books, k, generator=torch.Generator().manual_seed(1)) > 0.5
    valid[:, 0, 4] = False  # no rank has a candidate for this code
    packed = torch.cat([vectors, valid.float().unsqueeze(-1)], dim=-1)
    shared = _FakeGather(packed).share_candidates(Candidates(vectors[0], valid[0]))
    for b in range(books):
        for code in range(k):
            owners = [
                (code + j) % world for j in range(world) if valid[(code + j) % world, b, code]
            ]
            assert bool(shared.valid[b, code]) == bool(owners)
            if owners:
                assert torch.equal(shared.vectors[b, code], vectors[owners[0], b, code])


def test_single_process_issues_no_collective(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not dist.is_initialized()
    calls: list[str] = []
    for name in (
        "all_reduce",
        "all_gather_single",
        "all_gather_into_tensor",
        "broadcast",
        "gather",
    ):
        monkeypatch.setattr(dist, name, lambda *a, _n=name, **k: calls.append(_n))
    assert vqdist.active_group() is None and vqdist.sync_for() is None
    layer = vqfunc.VectorQuantize(
        4, 8, dim=-1, kmeans_init=True, replace_freq=2, ema_decay=0.9,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    for _ in range(3):
        layer(torch.randn(16, 4))
    cfg = layer.cfg
    params = vqfunc.warmup_params(layer.params, torch.randn(20, 4), cfg, sync=vqdist.sync_for())
    update_state(
        params, init_state(params, cfg), vqfunc.quantize(params, torch.randn(5, 4), cfg)[1], cfg
    )
    assert calls == []


def test_single_process_warmup_equals_the_core_warmup() -> None:
    cfg = vqfunc.VQConfig(feature_size=4, num_codes=6, dim=-1)
    params = vqfunc.init_params(cfg, generator=torch.Generator().manual_seed(0))
    x = torch.randn(30, 4, generator=torch.Generator().manual_seed(1))
    mask = torch.arange(30) % 3 != 0
    for method in ("data", "kmeans"):
        got = vqfunc.warmup_params(
            params,
            x,
            cfg,
            method=method,
            mask=mask,
            generator=torch.Generator().manual_seed(2),
            sync=vqdist.sync_for(),
        )
        want = vqfunc.warmup_params(
            params, x[mask], cfg, method=method, generator=torch.Generator().manual_seed(2)
        )
        assert torch.equal(got.codebook, want.codebook)
    with pytest.raises(ValueError, match="holds no vectors"):
        vqfunc.warmup_params(params, x[:0], cfg)
    with pytest.raises(ValueError, match=r"holds no vectors \(shape \(30, 4\), masked\)"):
        vqfunc.warmup_params(params, x, cfg, mask=torch.zeros(30, dtype=torch.bool))
