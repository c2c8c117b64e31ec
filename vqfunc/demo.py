"""`python -m vqfunc.demo`: a VQ autoencoder on scikit-learn's digits, recipe by recipe.

A small convolutional autoencoder with a `VectorQuantize` bottleneck is trained on the 1,797
8x8 digit images bundled with scikit-learn, once per recipe: the same architecture, data
order, initial weights and number of steps, changing only how the codebook is initialised and
trained. The last recipes replace the codebook by quantizers without one, at the same number
of codes: FSQ (`vqfunc.nn.FSQ`, levels `(8, 8, 4)`), LFQ and BSQ (`vqfunc.nn.LFQ`, 8 bits),
each between a 1x1 convolution from the code size down to its features and one back up. The
demo prints test MSE, code perplexity and code usage (measured on the held-out test images)
per recipe, and saves a PNG of test reconstructions and code-usage histograms.

Run `python -m vqfunc.demo --help` for the options. Needs the `demo` extra
(`pip install "vqfunc[demo]"`: scikit-learn and matplotlib).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import importlib.util
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from vqfunc._command_line import positive_int
from vqfunc._metrics import perplexity, usage
from vqfunc._warmup import WarmupMethod
from vqfunc.nn import FSQ, LFQ, VectorQuantize, codebook_warmup

__all__ = [
    "RECIPES",
    "AutoEncoder",
    "Bottleneck",
    "Recipe",
    "Result",
    "Settings",
    "build_model",
    "evaluate",
    "format_table",
    "load_data",
    "main",
    "parse_args",
    "run_all",
    "run_recipe",
    "save_figure",
    "train",
]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One way of training the codebook.

    Attributes:
        name: label in the table and figure.
        vq: keyword arguments of the quantizer layer on top of the shared ones.
        warmup: `codebook_warmup` method run on the untrained encoder, or None.
        quantizer: `"vq"` (`VectorQuantize`), or a quantizer without a codebook: `"fsq"`
            (`vqfunc.nn.FSQ`) or `"lfq"` (`vqfunc.nn.LFQ`), between 1x1 convolutions.
    """

    name: str
    vq: dict[str, Any] = dataclasses.field(default_factory=dict)
    warmup: WarmupMethod | None = None
    quantizer: Literal["vq", "fsq", "lfq"] = "vq"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Architecture and optimisation settings shared by every recipe."""

    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    channels: int = 16
    code_dim: int = 16
    num_codes: int = 256
    test_fraction: float = 0.2
    warmup_batches: int = 8


# `sync_nu` and `replace_freq` as in vqtorch's README example; a smaller `affine_lr` than its
# 10 (Adam already scales the steps); the usual EMA decay of VQ-VAE.
_SYNC = {"sync_nu": 0.2}
_AFFINE = {"affine_lr": 2.0}
_REPLACE = {"replace_freq": 20}
_EMA = {"ema_decay": 0.99}


def _codebook_sgd(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """vqtorch's in-place codebook optimizer for alternating optimisation."""
    return torch.optim.SGD(params, lr=50.0, momentum=0.9)


_ALTERNATE = {"inplace_optimizer": _codebook_sgd}

# The quantizers without a codebook, at the number of codes of the VQ recipes (256): FSQ's
# levels as close as 256 allows to the paper's advice of at least 5 per feature; LFQ and BSQ
# with 8 bits, with LFQConfig's default loss weights and with weights scaled to this task's
# reconstruction error (a test MSE near 0.005, against which the default commitment weight of
# 0.25 pins the features to their signs).
_FSQ_LEVELS = (8, 8, 4)
_LFQ = {"bits": 8}
_LFQ_SCALED = {"entropy_weight": 0.01, "commitment_weight": 0.01}

RECIPES: tuple[Recipe, ...] = (
    Recipe("baseline"),
    Recipe("+ data warm-up", warmup="data"),
    Recipe("+ k-means warm-up", warmup="kmeans"),
    Recipe("+ k-means, sync", {**_SYNC}, warmup="kmeans"),
    Recipe("+ k-means, sync, affine", {**_SYNC, **_AFFINE}, warmup="kmeans"),
    Recipe("+ k-means, sync, affine, replace", {**_SYNC, **_AFFINE, **_REPLACE}, warmup="kmeans"),
    Recipe("+ k-means, alternate, replace", {**_ALTERNATE, **_REPLACE}, warmup="kmeans"),
    Recipe("EMA", {**_EMA}),
    Recipe("EMA, k-means, replace", {**_EMA, **_REPLACE}, warmup="kmeans"),
    Recipe("FSQ (8, 8, 4)", {"levels": _FSQ_LEVELS}, quantizer="fsq"),
    Recipe("LFQ, 8 bits", {**_LFQ}, quantizer="lfq"),
    Recipe("LFQ, 8 bits, weights 0.01", {**_LFQ, **_LFQ_SCALED}, quantizer="lfq"),
    Recipe(
        "BSQ, 8 bits, weights 0.01", {**_LFQ, **_LFQ_SCALED, "spherical": True}, quantizer="lfq"
    ),
)


@dataclasses.dataclass(frozen=True)
class Result:
    """Test-set figures of one trained recipe."""

    name: str
    mse: float
    perplexity: float
    usage: float
    histogram: Tensor
    reconstructions: Tensor
    seconds: float


class Bottleneck(nn.Module):
    """A quantizer of `features` channels between 1x1 convolutions from and to `channels`."""

    def __init__(self, channels: int, features: int, quantizer: nn.Module) -> None:
        super().__init__()
        self.down = nn.Conv2d(channels, features, 1)
        self.quantizer = quantizer
        self.up = nn.Conv2d(features, channels, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Any]]:
        z_q, misc = self.quantizer(self.down(x))
        return self.up(z_q), misc


class AutoEncoder(nn.Module):
    """Conv encoder `[B, 1, 8, 8] -> [B, D, 4, 4]`, a quantizer layer, and a mirrored decoder."""

    def __init__(self, settings: Settings, vq: nn.Module) -> None:
        super().__init__()
        c, d = settings.channels, settings.code_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c, 2 * c, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * c, d, 1),
        )
        self.vq = vq
        self.decoder = nn.Sequential(
            nn.Conv2d(d, 2 * c, 3, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(c, 1, 3, padding=1),
        )

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Any]]:
        z_q, misc = self.vq(self.encoder(x))
        return self.decoder(z_q), misc


def load_data(seed: int, test_fraction: float) -> tuple[Tensor, Tensor]:
    """The digits as `[N, 1, 8, 8]` float32 in [0, 1], split into train and test."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "vqfunc.demo needs scikit-learn for its data: pip install 'vqfunc[demo]'"
        ) from error
    images = torch.as_tensor(load_digits().images, dtype=torch.float32) / 16.0
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    n_test = round(images.shape[0] * test_fraction)
    images = images[order].unsqueeze(1)
    return images[n_test:], images[:n_test]


def build_model(recipe: Recipe, settings: Settings, seed: int) -> AutoEncoder:
    """The autoencoder for `recipe`, with weights that depend on `seed` only."""
    torch.manual_seed(seed)
    vq: nn.Module
    if recipe.quantizer == "fsq":
        fsq = FSQ(**recipe.vq)
        vq = Bottleneck(settings.code_dim, fsq.cfg.feature_size, fsq)
    elif recipe.quantizer == "lfq":
        lfq = LFQ(**recipe.vq)
        vq = Bottleneck(settings.code_dim, lfq.cfg.feature_size, lfq)
    else:
        vq = VectorQuantize(
            settings.code_dim,
            settings.num_codes,
            generator=torch.Generator().manual_seed(seed),
            **recipe.vq,
        )
    return AutoEncoder(settings, vq)


def train(
    recipe: Recipe,
    train_x: Tensor,
    settings: Settings,
    seed: int,
    *,
    on_step: Callable[[], None] | None = None,
) -> AutoEncoder:
    """Train the autoencoder of `recipe` for `settings.steps` steps of Adam.

    Every recipe sees the same initial weights and the same batches (both from `seed`).
    `on_step` is called after every step (e.g. to advance a progress bar).
    """
    model = build_model(recipe, settings, seed)
    batches = _batches(train_x, settings.batch_size, torch.Generator().manual_seed(seed + 1))
    if recipe.warmup is not None:
        loader = [next(batches) for _ in range(settings.warmup_batches)]
        codebook_warmup(
            model,
            loader,
            recipe.warmup,
            num_batch=len(loader),
            generator=torch.Generator().manual_seed(seed + 2),
            progress_bar=False,
        )
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
    model.train()
    for _ in range(settings.steps):
        x = next(batches)
        recon, misc = model(x)
        loss = F.mse_loss(recon, x) + misc["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step()
    return model


def _batches(train_x: Tensor, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless shuffled mini-batches of `train_x` (each epoch a new permutation)."""
    while True:
        order = torch.randperm(train_x.shape[0], generator=generator)
        for start in range(0, train_x.shape[0] - batch_size + 1, batch_size):
            yield train_x[order[start : start + batch_size]]


@torch.no_grad()
def evaluate(model: AutoEncoder, test_x: Tensor) -> tuple[float, Tensor, Tensor]:
    """Test MSE, the `[K]` code histogram and the reconstructions `[N, 1, 8, 8]` of `test_x`."""
    model.eval()
    recon, misc = model(test_x)
    return F.mse_loss(recon, test_x).item(), misc["histogram"].sum(0), recon


def run_recipe(
    index: int,
    train_x: Tensor,
    test_x: Tensor,
    settings: Settings,
    seed: int,
    *,
    on_step: Callable[[], None] | None = None,
) -> Result:
    """Train and evaluate `RECIPES[index]` (an index, so that it crosses processes)."""
    start = time.perf_counter()
    recipe = RECIPES[index]
    model = train(recipe, train_x, settings, seed, on_step=on_step)
    mse, histogram, recon = evaluate(model, test_x)
    return Result(
        name=recipe.name,
        mse=mse,
        perplexity=perplexity(histogram).item(),
        usage=usage(histogram).item(),
        histogram=histogram,
        reconstructions=recon,
        seconds=time.perf_counter() - start,
    )


def run_all(
    train_x: Tensor,
    test_x: Tensor,
    settings: Settings,
    seed: int,
    *,
    jobs: int,
    threads: int,
    progress_bar: bool,
) -> list[Result]:
    """Every recipe, in `jobs` worker processes (in this process when `jobs == 1`).

    Each recipe runs on `threads` torch threads; a process's recipe does not depend on which
    process runs it, so the results are the same for any `jobs`.
    """
    total = settings.steps * len(RECIPES)
    if jobs == 1:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            results = []
            for index, recipe in enumerate(RECIPES):
                with tqdm(total=settings.steps, desc=recipe.name, disable=not progress_bar) as bar:
                    tick = functools.partial(bar.update, 1)
                    results.append(run_recipe(index, train_x, test_x, settings, seed, on_step=tick))
        finally:
            torch.set_num_threads(previous)
        return results
    context = multiprocessing.get_context("spawn")
    counter = context.Value("q", 0)
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=jobs, mp_context=context, initializer=_init_worker, initargs=(counter, threads)
    ) as pool:
        futures = [
            pool.submit(_worker_run, index, train_x, test_x, settings, seed)
            for index in range(len(RECIPES))
        ]
        desc = f"{len(RECIPES)} recipes, {jobs} processes"
        with tqdm(total=total, desc=desc, disable=not progress_bar) as bar:
            pending = set(futures)
            while pending:
                _, pending = concurrent.futures.wait(pending, timeout=0.5)
                bar.update(counter.value - bar.n)
        return [future.result() for future in futures]


# Steps done by all worker processes together (set in each worker by `_init_worker`).
_STEP_COUNTER: Any = None


def _init_worker(counter: Any, threads: int) -> None:
    global _STEP_COUNTER
    _STEP_COUNTER = counter
    torch.set_num_threads(threads)


def _count_step() -> None:
    with _STEP_COUNTER.get_lock():
        _STEP_COUNTER.value += 1


def _worker_run(
    index: int, train_x: Tensor, test_x: Tensor, settings: Settings, seed: int
) -> Result:
    return run_recipe(index, train_x, test_x, settings, seed, on_step=_count_step)


def format_table(results: Sequence[Result], num_codes: int) -> str:
    """The results as a plain-text table (MSE also relative to the first recipe)."""
    base = results[0].mse
    header = f"{'recipe':<34} {'test MSE':>9} {'vs base':>8} {'perplexity':>10} {'usage':>7}"
    lines = [header, "-" * len(header)]
    for r in results:
        ratio = r.mse / base if base > 0 else math.nan
        lines.append(
            f"{r.name:<34} {r.mse:>9.5f} {ratio:>8.3f} {r.perplexity:>10.1f} {100 * r.usage:>6.1f}%"
        )
    lines.append(f"(perplexity out of {num_codes} codes; usage and MSE on the test set)")
    return "\n".join(lines)


def save_figure(results: Sequence[Result], test_x: Tensor, path: str, num_show: int = 8) -> None:
    """Reconstructions (one row per recipe) and code-usage histograms, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "vqfunc.demo needs matplotlib for its figure: pip install 'vqfunc[demo]'"
        ) from error
    fig, axes = plt.subplots(
        len(results) + 1,
        2,
        figsize=(10, 0.9 * (len(results) + 1) + 0.6),
        gridspec_kw={"width_ratios": [num_show, 0.75 * num_show]},
        squeeze=False,
        layout="constrained",
    )
    strips = [("test images", test_x)] + [(r.name, r.reconstructions) for r in results]
    for (label, images), ax in zip(strips, axes[:, 0], strict=True):
        # One strip of `num_show` digits, with a one-pixel gap between them.
        padded = F.pad(images[:num_show, 0].clamp(0, 1), (0, 1), value=0.0)
        ax.imshow(padded.permute(1, 0, 2).reshape(8, -1).numpy(), cmap="gray_r", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    axes[0, 1].axis("off")
    for result, ax in zip(results, axes[1:, 1], strict=True):
        counts = result.histogram.sort(descending=True).values
        # One filled outline, not one patch per code: 256 bars per axis are slow to draw.
        ax.stairs(counts.numpy(), fill=True, color="tab:blue")
        # An outline too, so that a single used code (a one-code-wide bar) stays visible.
        ax.stairs(counts.numpy(), color="tab:blue", linewidth=1.5)
        ax.set_xlim(0, counts.numel())
        ax.set_xticks([])
        ax.tick_params(labelsize=6)
        ax.text(
            0.98,
            0.9,
            f"MSE {result.mse:.4f}  usage {100 * result.usage:.1f}%  "
            f"perplexity {result.perplexity:.0f}",
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=7,
        )
    fig.suptitle(
        "vqfunc demo: test reconstructions per recipe (left), "
        f"test-set code counts of the {results[0].histogram.numel()} codes, sorted (right)",
        fontsize=10,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _require_demo_extra() -> None:
    """Fail before training, not after, when a demo-only dependency is missing."""
    missing = [name for name in ("sklearn", "matplotlib") if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(
            f"vqfunc.demo needs {' and '.join(missing)} (scikit-learn for the data, matplotlib "
            "for the figure): pip install 'vqfunc[demo]'"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="python -m vqfunc.demo",
        description="Train a VQ autoencoder on scikit-learn's digits with each codebook recipe.",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=defaults.steps, help="training steps per recipe"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of data split and weights")
    parser.add_argument("--out", default="vqfunc_demo.png", help="path of the PNG figure")
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch CPU threads (default 1: the model is tiny, and more threads only contend)",
    )
    parser.add_argument(
        "--jobs",
        type=positive_int,
        default=None,
        help="recipes trained at once, each in its own process (default: 2 on two or more "
        "cores, else 1; 1 with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny run (seconds), for tests")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m vqfunc.demo`."""
    args = parse_args(argv)
    _require_demo_extra()
    settings = Settings(steps=args.steps)
    jobs = args.jobs
    if jobs is None:
        jobs = 1 if args.quick else min(2, os.cpu_count() or 1)
    if args.quick:
        settings = dataclasses.replace(settings, steps=min(args.steps, 10), warmup_batches=2)
    train_x, test_x = load_data(args.seed, settings.test_fraction)
    print(
        f"digits: {train_x.shape[0]} train / {test_x.shape[0]} test images; "
        f"{settings.num_codes} codes of size {settings.code_dim}, {settings.steps} steps"
    )
    start = time.perf_counter()
    results = run_all(
        train_x,
        test_x,
        settings,
        args.seed,
        jobs=jobs,
        threads=args.threads,
        progress_bar=not args.no_progress,
    )
    print(format_table(results, settings.num_codes))
    save_figure(results, test_x, args.out)
    print(f"figure saved to {args.out}; {time.perf_counter() - start:.0f} s in all")
    return 0


if __name__ == "__main__":
    # Run the imported module's `main`, so that worker processes find the same functions.
    from vqfunc.demo import main as _main

    sys.exit(_main())
