"""One rank of the multi-process LFQ tests of `tests/integration/test_lfq_distributed.py`
(gloo backend, CPU).

Run as `python tests/support/lfq_dist_worker.py RANK WORLD INIT_METHOD OUT_DIR`; each rank
writes what the test compares to `OUT_DIR/lfq_rank<RANK>.pt`:

- `functional`: `vqfunc.lfq.quantize(..., sync=)` and `quantize_residual(..., sync=)` on this
  rank's batch (unequal sizes, partly masked; the last rank's second batch is empty): the
  loss terms and the gradient of the loss to this rank's input, plus the batch itself;
- `layer`: a Linear encoder and a `vqfunc.nn.LFQ` layer trained with DistributedDataParallel
  for a few steps on different batches: the per-step losses and the final weights.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import vqfunc
from vqfunc import distributed as vqdist
from vqfunc import lfq

CFG = lfq.LFQConfig(bits=8, dim=-1, inv_temperature=3.0, commitment_weight=0.5)
RCFG = lfq.ResidualLFQConfig(bits=6, num_quantizers=2, dim=-1, inv_temperature=3.0)
TERMS = ("loss", "per_sample_entropy", "codebook_entropy", "commitment")


def batch(rank: int, features: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(size, 7, features, dtype=torch.float64, generator=g) + 0.5 * rank
    return x, torch.rand(size, 7, generator=g) > 0.25


def functional(rank: int, world: int) -> dict[str, object]:
    sync = vqdist.sync_for()
    assert sync is not None
    result: dict[str, object] = {}
    cases = (("lfq", CFG, lfq.quantize, 5 - 2 * rank), ("rlfq", RCFG, lfq.quantize_residual, 3))
    for name, cfg, quantize, size in cases:
        for tag, rows in (("", size), ("_empty", 0 if rank == world - 1 else size)):
            x, mask = batch(rank, cfg.bits, rows)
            leaf = x.clone().requires_grad_()
            _, out = quantize(leaf, cfg, mask=mask, sync=sync)
            (grad,) = torch.autograd.grad(out.loss, [leaf])
            result[name + tag] = {
                "x": x,
                "mask": mask,
                "grad": grad,
                **{term: getattr(out, term).detach() for term in TERMS},
            }
    return result


def layer(rank: int) -> dict[str, object]:
    torch.manual_seed(0)  # the same initial encoder on every rank
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), vqfunc.nn.LFQ(8, dim=-1))
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    losses = []
    for step in range(4):
        g = torch.Generator().manual_seed(10 * rank + step)
        x = torch.randn(3 + rank, 6, 5, generator=g)
        z_q, misc = ddp(x)
        # The LFQ loss is the union's on every rank; the task term stays each rank's own.
        optimizer.zero_grad()
        (misc["loss"] + (z_q - 0.5).square().mean()).backward()
        optimizer.step()
        losses.append(misc["loss"].detach())
    return {"losses": torch.stack(losses), "weight": model[0].weight.detach().clone()}


def main() -> None:
    rank, world, init_method, out = sys.argv[1:5]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=init_method,
        rank=int(rank),
        world_size=int(world),
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        result = {"functional": functional(int(rank), int(world)), "layer": layer(int(rank))}
        torch.save(result, Path(out) / f"lfq_rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
