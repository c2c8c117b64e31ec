"""Quantizer dropout under torch.distributed: 2 gloo ranks with different data and batch sizes
draw the same depths, keep identical codebooks, and never drop in eval (slow: multi-process)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from support.ranks import launch

WORKER = Path(__file__).resolve().parents[1] / "support" / "codec_dist_worker.py"
WORLD, LEVELS = 2, 6

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(),
        reason="needs torch.distributed gloo",
    ),
]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("codec_dist")
    store = f"file://{out / 'store'}"
    launch(
        WORKER,
        lambda rank: (str(rank), str(WORLD), store, str(out)),
        world=WORLD,
        timeout_s=120,
        what="codec",
    )
    return [torch.load(out / f"codec_rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_per_batch_depth_is_the_same_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    per_rank = []
    for result in ranks:
        steps = []
        for depth in result["depths_a"]:
            assert len(torch.unique(depth)) == 1  # one depth for the whole local batch
            steps.append(int(depth.flatten()[0]))
        per_rank.append(steps)
    assert per_rank[0] == per_rank[1]
    assert len(set(per_rank[0])) > 1  # the depth does change from step to step
    assert all(1 <= d <= LEVELS for d in per_rank[0])


def test_per_sample_depths_drop_a_fraction_of_the_samples(ranks: list[dict[str, Any]]) -> None:
    for result in ranks:
        for depth in result["depths_b"]:
            samples = depth[:, 0]
            dropped = samples.shape[0] // 2
            assert torch.equal(samples[dropped:], torch.full_like(samples[dropped:], LEVELS))
            assert bool((depth == depth[:, :1]).all())  # the vectors of a sample share it


def test_ranks_keep_identical_codebooks_and_eval_never_drops(ranks: list[dict[str, Any]]) -> None:
    assert torch.equal(ranks[0]["codebook_a"], ranks[1]["codebook_a"])
    assert torch.equal(ranks[0]["counters_a"], ranks[1]["counters_a"])
    for result in ranks:
        assert bool((result["eval_depth"] == LEVELS).all())


def test_grouped_layer_keeps_every_group_in_agreement(ranks: list[dict[str, Any]]) -> None:
    grouped = [result["grouped"] for result in ranks]
    assert bool(grouped[0]["kmeans_initialized"])
    assert grouped[0]["codebook"].shape == (2, 3, 4, 2)
    for name, value in grouped[0].items():
        assert torch.equal(value, grouped[1][name]), name
