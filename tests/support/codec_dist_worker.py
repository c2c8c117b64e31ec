"""One rank of `tests/integration/test_codec_distributed.py` (gloo backend, CPU).

Run as `python tests/support/codec_dist_worker.py RANK WORLD INIT_METHOD OUT_DIR`. Each rank
trains an encoder and three `ResidualVectorQuantize` layers (one grouped, with k-means
warm-up, EMA and replacement) with quantizer dropout (gradients
averaged over the ranks with `all_reduce`, replacement kept in agreement by the layer), on
data and local batch sizes of its own, and writes the depths the layer drew at every step, an
eval pass and the final params to `OUT_DIR/codec_rank<RANK>.pt`.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import vqfunc

LEVELS, FEATURES, STEPS = 6, 4, 12


def run(rank: int, out: Path) -> None:
    torch.manual_seed(0)  # the same initial weights on every rank
    enc = nn.Linear(3, FEATURES)
    per_batch = vqfunc.ResidualVectorQuantize(
        FEATURES, 8 * LEVELS, levels=LEVELS, share=False, dim=-1, replace_freq=2,
        quantizer_dropout=1.0, dropout_per="batch",
    )  # fmt: skip
    per_sample = vqfunc.ResidualVectorQuantize(
        FEATURES, (8, 8, 4, 4, 2, 2), levels=LEVELS, share=False, dim=-1,
        quantizer_dropout=0.5, dropout_per="sample",
    )  # fmt: skip
    grouped = vqfunc.ResidualVectorQuantize(
        FEATURES, 4 * 3, levels=3, share=False, dim=-1, channel_groups=2, ema_decay=0.8,
        replace_freq=2, kmeans_init=True, quantizer_dropout=1.0, dropout_per="batch",
    )  # fmt: skip
    model = nn.ModuleDict({"enc": enc, "a": per_batch, "b": per_sample, "c": grouped})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    data = torch.Generator().manual_seed(100 + rank)  # different data on every rank
    depths_a, depths_b = [], []
    for step in range(STEPS):
        size = 4 + 3 * rank + step % 3  # different local batch sizes
        x = torch.randn(size, 5, 3, generator=data)
        z = model["enc"](x)
        z_a, misc_a = model["a"](z)
        z_b, misc_b = model["b"](z_a)
        z_c, misc_c = model["c"](z)
        loss = (z_b - z).pow(2).mean() + misc_a["loss"] + misc_b["loss"]
        loss = loss + (z_c - z).pow(2).mean() + misc_c["loss"]
        optimizer.zero_grad()
        loss.backward()
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        optimizer.step()
        depths_a.append(misc_a["depth"].clone())
        depths_b.append(misc_b["depth"].clone())
    model.eval()
    with torch.no_grad():
        _, misc_eval = model["a"](torch.randn(7, 5, FEATURES, generator=data))
    result = {
        "depths_a": depths_a,
        "depths_b": depths_b,
        "eval_depth": misc_eval["depth"],
        "codebook_a": per_batch.codebook.detach(),
        "counters_a": per_batch.replace_counters,
        "grouped": {name: value.clone() for name, value in grouped.state_dict().items()},
    }
    torch.save(result, out / f"codec_rank{rank}.pt")


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
        run(int(rank), Path(out))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
