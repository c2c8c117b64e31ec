"""LFQ under torch.distributed: 2 gloo processes with different batches compute the same loss,
equal to the single-process loss of the union of their batches (slow: multi-process).

The ranks run `tests/support/lfq_dist_worker.py` with a file store in a temporary directory,
and the test fails instead of hanging when they do not finish within the timeout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from support.ranks import launch

from vqfunc import lfq

WORKER = Path(__file__).resolve().parents[1] / "support" / "lfq_dist_worker.py"
WORLD = 2
TIMEOUT_S = 120
TERMS = ("loss", "per_sample_entropy", "codebook_entropy", "commitment")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(),
        reason="needs torch.distributed gloo",
    ),
]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("lfq_dist")
    store = f"file://{out / 'store'}"
    launch(
        WORKER,
        lambda rank: (str(rank), str(WORLD), store, str(out)),
        world=WORLD,
        timeout_s=TIMEOUT_S,
        what="lfq",
    )
    return [torch.load(out / f"lfq_rank{r}.pt", weights_only=False) for r in range(WORLD)]


CASES = {
    "lfq": (
        lfq.LFQConfig(bits=8, dim=-1, inv_temperature=3.0, commitment_weight=0.5),
        lfq.quantize,
    ),
    "rlfq": (
        lfq.ResidualLFQConfig(bits=6, num_quantizers=2, dim=-1, inv_temperature=3.0),
        lfq.quantize_residual,
    ),
}


@pytest.mark.parametrize("case", ["lfq", "rlfq", "lfq_empty", "rlfq_empty"])
def test_ranks_compute_the_loss_of_the_union(ranks: list[dict[str, Any]], case: str) -> None:
    rank0, rank1 = (r["functional"][case] for r in ranks)
    different = rank0["x"].shape != rank1["x"].shape or not torch.equal(rank0["x"], rank1["x"])
    assert different
    for term in TERMS:
        assert torch.equal(rank0[term], rank1[term]), term  # bit for bit: one all-reduce
    cfg, quantize = CASES[case.removesuffix("_empty")]
    x = torch.cat([rank0["x"], rank1["x"]]).requires_grad_()
    mask = torch.cat([rank0["mask"], rank1["mask"]])
    _, union = quantize(x, cfg, mask=mask)
    for term in TERMS:
        torch.testing.assert_close(rank0[term], getattr(union, term).detach(), msg=term)
    # Each rank's rows get WORLD times the union loss's gradient: DDP's mean is then exact.
    (grad,) = torch.autograd.grad(union.loss, [x])
    rows = rank0["x"].shape[0]
    torch.testing.assert_close(rank0["grad"], WORLD * grad[:rows])
    torch.testing.assert_close(rank1["grad"], WORLD * grad[rows:])


def test_ddp_training_with_the_layer_keeps_the_ranks_in_step(ranks: list[dict[str, Any]]) -> None:
    rank0, rank1 = (r["layer"] for r in ranks)
    assert torch.equal(rank0["losses"], rank1["losses"])  # one loss, different batches
    assert torch.equal(rank0["weight"], rank1["weight"])
    assert len(set(rank0["losses"].tolist())) > 1  # it trained
