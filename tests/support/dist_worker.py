"""One rank of the multi-process tests of `tests/integration/test_distributed.py`
(gloo backend, CPU).

Run as `python tests/support/dist_worker.py SCENARIO RANK WORLD INIT_METHOD OUT_DIR`; each rank
writes what the test compares to `OUT_DIR/<name>_rank<RANK>.pt`. `main` runs `train` then `empty`.

Scenarios:
    train: a small model with two `VectorQuantize` layers (k-means init, dead-code replacement,
        EMA; grouped separate codebooks with affine parameters and an in-place codebook
        optimizer) and a k-means-initialised
        `ResidualVectorQuantize`, trained with
        DistributedDataParallel on unequal, partly masked batches; a checkpoint is written
        half-way. The same model is also trained with the library's collectives switched off,
        as a control that the ranks do diverge without them.
    resume: a fresh process loads that checkpoint and trains the second half.
    compiled: a compiled functional step with `sync=` (run by hand; compiling is slow).
    usage: `VectorQuantize` (grouped, EMA, usage rule by ratio) and `ResidualVectorQuantize`
        (EMA, usage rule by count) trained on each rank's own data, with and without the
        library's collectives.
    empty: one rank's batch is empty on the first step (the k-means warm-up step) and fully
        masked on another; also the functional API (`warmup_params(sync=)`,
        `update_state(sync=)`) with one empty rank, against single-process references.
"""

from __future__ import annotations

import datetime
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import vqfunc
from vqfunc import distributed as vqdist
from vqfunc._ema import ema_statistics
from vqfunc._replace import draw_replace_randomness, sample_candidates
from vqfunc._state import init_state, update_state

IN, FEATURES, TOKENS = 6, 8, 5
STEPS, HALF = 8, 4


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(IN, FEATURES)
        self.vq = vqfunc.VectorQuantize(
            FEATURES, 16, dim=-1, kmeans_init=True, replace_freq=2, ema_decay=0.8
        )
        self.vq2 = vqfunc.VectorQuantize(
            FEATURES, 12, dim=-1, groups=2, share=False, kmeans_init=True, replace_freq=3,
            affine_lr=1.0, inplace_optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
        )  # fmt: skip
        self.rvq = vqfunc.ResidualVectorQuantize(
            FEATURES, 10, levels=2, share=False, dim=-1, kmeans_init=True
        )
        self.dec = nn.Linear(FEATURES, IN)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        z, misc = self.vq(self.enc(x), mask=mask)
        z2, misc2 = self.vq2(z, mask=mask)
        z3, misc3 = self.rvq(z2, mask=mask)
        return self.dec(z3), misc["loss"] + misc2["loss"] + misc3["loss"]


def batch(rank: int, step: int, *, empty_steps: tuple[int, ...] = (), masked_steps=()):
    """This rank's batch: unequal sizes per rank, some positions masked, deterministic."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    size = 0 if step in empty_steps else 4 - rank
    # Clustered data, shifted per rank, so that ranks see different codes.
    x = torch.randn(size, TOKENS, IN, generator=g) + 3.0 * rank
    mask = torch.rand(size, TOKENS, generator=g) > 0.2
    if step in masked_steps:
        mask = torch.zeros_like(mask)
    return x, mask


def make_model() -> tuple[Model, DistributedDataParallel, torch.optim.Optimizer]:
    torch.manual_seed(0)  # the same initial model on every rank
    model = Model()
    # Buffers are not broadcast by DDP: the library's collectives alone must keep them equal.
    ddp = DistributedDataParallel(model, broadcast_buffers=False)
    trainable = [p for p in ddp.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.05, momentum=0.9)
    return model, ddp, optimizer


def train_steps(ddp, optimizer, rank: int, steps: range, **batch_kw) -> None:
    for step in steps:
        x, mask = batch(rank, step, **batch_kw)
        recon, vq_loss = ddp(x, mask)
        weights = mask.unsqueeze(-1).to(x.dtype)
        recon_loss = ((recon - x).square() * weights).sum() / weights.sum().clamp_min(1.0)
        optimizer.zero_grad()
        (recon_loss + vq_loss).backward()
        optimizer.step()


def plain_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def scenario_train(rank: int, out: Path) -> None:
    model, ddp, optimizer = make_model()
    torch.manual_seed(100 + rank)  # ranks draw different local randomness
    train_steps(ddp, optimizer, rank, range(HALF))
    if rank == 0:
        torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict()}, out / "ckpt.pt"
        )
    torch.save(torch.get_rng_state(), out / f"rng_rank{rank}.pt")
    train_steps(ddp, optimizer, rank, range(HALF, STEPS))
    torch.save(plain_state(model), out / f"train_rank{rank}.pt")

    # Control: the same run with the library's collectives switched off.
    real_active_group = vqdist.active_group
    vqdist.active_group = lambda group=None: None  # type: ignore[assignment]
    try:
        model, ddp, optimizer = make_model()
        torch.manual_seed(100 + rank)
        train_steps(ddp, optimizer, rank, range(STEPS))
    finally:
        vqdist.active_group = real_active_group
    torch.save(plain_state(model), out / f"control_rank{rank}.pt")


def scenario_resume(rank: int, out: Path) -> None:
    model, ddp, optimizer = make_model()
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(torch.load(out / f"rng_rank{rank}.pt", weights_only=True))
    train_steps(ddp, optimizer, rank, range(HALF, STEPS))
    torch.save(plain_state(model), out / f"resume_rank{rank}.pt")


def scenario_empty(rank: int, out: Path) -> None:
    model, ddp, optimizer = make_model()
    torch.manual_seed(100 + rank)
    # Rank 1: empty on the k-means step 0 and on step 3, fully masked on step 2.
    kw = {"empty_steps": (0, 3), "masked_steps": (2,)} if rank == 1 else {}
    train_steps(ddp, optimizer, rank, range(5), **kw)
    result: dict[str, object] = {"layer": plain_state(model)}
    result["one_empty"] = functional_step(rank, 0 if rank == 1 else 9)
    result["both"] = functional_step(rank, 9 - 4 * rank)
    result["codebook_warmup"] = warmup_from_unequal_loaders(rank)
    result["errors"] = errors_reach_every_rank(rank)
    result["nan_row_warmup"] = nan_row_left_out_of_the_warmup(rank)
    torch.save(result, out / f"empty_rank{rank}.pt")


def errors_reach_every_rank(rank: int) -> list[str]:
    """Non-finite rows reaching the collective fit on one rank, or a fit failing on the first
    rank: every rank raises, none hangs."""
    caught = []
    cfg = vqfunc.VQConfig(feature_size=4, num_codes=3, dim=-1)
    params = vqfunc.init_params(cfg)
    x = torch.randn(5, 4)
    if rank == 1:
        x[2, 1] = float("nan")
    sync = vqdist.sync_for()
    assert sync is not None
    try:
        sync.fit_on_first_rank(x, params.codebook, lambda data: data[:3])
    except ValueError as exc:
        caught.append(f"ValueError: {exc}")

    def fit(data: Tensor) -> Tensor:
        raise ArithmeticError("fit failed")

    try:
        sync.fit_on_first_rank(torch.randn(5, 4), params.codebook, fit)
    except (ArithmeticError, RuntimeError) as exc:
        caught.append(f"{type(exc).__name__}: {exc}")
    return caught


def nan_row_left_out_of_the_warmup(rank: int) -> tuple[Tensor, Tensor]:
    """`warmup_params(sync=)` with a NaN row on rank 1: that row is left out, the ranks agree;
    returns the codebook and the single-process warm-up on the finite rows of both ranks."""
    cfg = vqfunc.VQConfig(feature_size=4, num_codes=3, dim=-1)
    params = vqfunc.init_params(cfg, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(rank))
    if rank == 1:
        x[2, 1] = float("nan")
    warm = vqfunc.warmup_params(
        params, x, cfg, generator=torch.Generator().manual_seed(1), sync=vqdist.sync_for()
    )
    everyone = [torch.empty(0)] * dist.get_world_size()
    dist.all_gather_object(everyone, x)
    finite = torch.cat(everyone)
    finite = finite[torch.isfinite(finite).all(-1)]
    reference = vqfunc.warmup_params(
        params, finite, cfg, generator=torch.Generator().manual_seed(1)
    )
    return warm.codebook, reference.codebook


def warmup_from_unequal_loaders(rank: int) -> tuple[Tensor, Tensor]:
    """`codebook_warmup` with 3 batches on rank 0 and 1 on rank 1, and per-rank generators."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, FEATURES), vqfunc.VectorQuantize(FEATURES, 16, dim=-1))
    before = model[1].codebook.detach().clone()
    g = torch.Generator().manual_seed(rank)
    loader = [torch.randn(4, TOKENS, IN, generator=g) + 3.0 * rank for _ in range(3 - 2 * rank)]
    vqfunc.codebook_warmup(model, loader, "kmeans", num_batch=3, generator=g, progress_bar=False)
    return before, model[1].codebook.detach().clone()


def functional_step(rank: int, size: int) -> dict[str, object]:
    """One functional warm-up and `update_state(sync=)` with `size` vectors on this rank.

    Returns the synced results with what the test needs to recompute them independently:
    this rank's data, local statistics and local candidates, and (on rank 0) the purely local
    update.
    """
    world = dist.get_world_size()
    cfg = vqfunc.VQConfig(feature_size=4, num_codes=6, dim=-1, replace_freq=1, ema_decay=0.5)
    params = vqfunc.init_params(cfg, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(7 + rank)
    x = torch.randn(size, 4, generator=g) + 2.0 * rank
    everyone = [torch.empty(0)] * world
    dist.all_gather_object(everyone, x)  # only for the reference below
    warm = vqfunc.warmup_params(
        params,
        x,
        cfg,
        method="kmeans",
        generator=torch.Generator().manual_seed(3 + rank),
        sync=vqdist.sync_for(),
    )
    # Reference: the first rank's generator on the data of all ranks, in rank order.
    warm_ref = vqfunc.warmup_params(
        params,
        torch.cat(everyone),
        cfg,
        method="kmeans",
        generator=torch.Generator().manual_seed(3),
    )
    # The step starts from the initial codebook: away from the data, some codes go unused.
    state = init_state(params, cfg)
    _, out = vqfunc.quantize(params, x, cfg)
    randomness = draw_replace_randomness(x.shape[0], cfg, generator=g)
    synced = update_state(params, state, out, cfg, randomness=randomness, sync=vqdist.sync_for())
    local = update_state(params, state, out, cfg, randomness=randomness)
    return {
        "warm": warm.codebook,
        "warm_ref": warm_ref.codebook,
        "synced": synced,
        "local": local,
        "params0": params,
        "state0": state,
        "histogram": out.histogram,
        "stats": ema_statistics(out.z, out.codes, cfg),
        "candidates": sample_candidates(out.z, out.codes, cfg, randomness=randomness),
    }


def scenario_compiled(rank: int, out: Path) -> None:
    """`torch.compile(fullgraph=True)` of a synced functional step (not run by the suite: slow).

    Asserts no graph break, one graph, no recompile over 3 steps, eager results, equal ranks.
    """
    cfg = vqfunc.VQConfig(feature_size=8, num_codes=16, dim=-1, replace_freq=2, ema_decay=0.9)
    params = vqfunc.init_params(cfg, generator=torch.Generator().manual_seed(0))
    state = init_state(params, cfg)
    g = torch.Generator().manual_seed(10 + rank)

    def step(params, state, x, randomness):
        _, q = vqfunc.quantize(params, x, cfg)
        return update_state(params, state, q, cfg, randomness=randomness, sync=vqdist.sync_for())

    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(step, fullgraph=True)
    eager = (params, state)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            x = torch.randn(16, 8, generator=g) + rank
            randomness = draw_replace_randomness(16, cfg, generator=g)
            params, state = compiled(params, state, x, randomness)
            eager = step(*eager, x, randomness)
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(params.codebook, eager[0].codebook, rtol=1e-5, atol=1e-5)
    assert torch.equal(state.replace.counters, eager[1].replace.counters)
    torch.save({"params": params, "state": state}, out / f"compiled_rank{rank}.pt")


def _usage_layers() -> list[nn.Module]:
    common = {"dim": -1, "replace_rule": "usage", "replace_decay": 0.5, "ema_decay": 0.9}
    g = torch.Generator().manual_seed(0)  # the same initial codebooks on every rank
    return [
        vqfunc.VectorQuantize(
            FEATURES, 16, groups=2, share=False, replace_threshold=0.5, generator=g, **common
        ),
        vqfunc.ResidualVectorQuantize(
            FEATURES,
            8,
            levels=2,
            replace_usage="count",
            replace_threshold=1.0,
            generator=g,
            **common,
        ),
    ]


def _train_usage_layers(rank: int) -> dict[str, Tensor]:
    layers = _usage_layers()
    torch.manual_seed(100 + rank)  # ranks draw different local candidates
    data = torch.Generator().manual_seed(10 + rank)
    for step in range(6):
        rows = 12 + 5 * rank  # unequal batches, rank 1's shifted: different data
        x = torch.randn(rows, FEATURES, generator=data) * 0.3 + rank
        mask = torch.rand(rows, generator=data) > 0.2 if step % 2 else None
        for layer in layers:
            layer(x, mask=mask)
    return {
        f"{name}.{key}": value.detach().clone()
        for name, layer in zip(("vq", "rvq"), layers, strict=True)
        for key, value in layer.state_dict().items()
    }


def scenario_usage(rank: int, out: Path) -> None:
    torch.save(_train_usage_layers(rank), out / f"usage_rank{rank}.pt")
    real_active_group = vqdist.active_group
    vqdist.active_group = lambda group=None: None  # type: ignore[assignment]
    try:
        control = _train_usage_layers(rank)
    finally:
        vqdist.active_group = real_active_group
    torch.save(control, out / f"usage_control_rank{rank}.pt")
    fresh = {
        f"{n}.codebook": layer.codebook.detach()
        for n, layer in zip(("vq", "rvq"), _usage_layers(), strict=True)
    }
    torch.save(fresh, out / f"usage_initial_rank{rank}.pt")


# One launch runs several scenarios: each process start (importing torch) costs seconds.
SCENARIOS = {
    "main": (scenario_train, scenario_empty),
    "resume": (scenario_resume,),
    "empty": (scenario_empty,),
    "compiled": (scenario_compiled,),
    "usage": (scenario_usage,),
}


def main() -> None:
    scenario, rank, world, init_method, out = sys.argv[1:6]
    torch.set_num_threads(1)
    # DDP's broadcast_buffers=False is the documented way to keep buffers rank-local.
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
    dist.init_process_group(
        "gloo",
        init_method=init_method,
        rank=int(rank),
        world_size=int(world),
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        for run in SCENARIOS[scenario]:
            run(int(rank), Path(out))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
