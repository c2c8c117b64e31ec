# %% [markdown]
# # The layer in a model: warm-up, the recipe ladder, and keeping every code alive
#
# `vqfunc.VectorQuantize` is an `nn.Module` like any other: put it in a model, add
# `misc["loss"]` to the training loss, train with any optimizer. What decides whether it works
# is the codebook: a codebook that does not match the encoder's outputs ends with a handful of
# codes doing all the work and the rest dead (**index collapse**).
#
# This notebook first makes index collapse visible on a 2-D toy, where the codes can be drawn on
# top of the data as they learn, then trains a convolutional autoencoder on scikit-learn's digits
# with a ladder of recipes (warm-up, synchronized update, affine re-parameterisation, dead-code
# replacement, EMA) and watches reconstructions and code usage.

# %%
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits, make_moons
from torch import nn

import vqfunc
from vqfunc.inits import codebook_warmup

torch.set_num_threads(1)  # the models here are tiny: one CPU thread is the fastest
torch.manual_seed(0)

# %% [markdown]
# ## 1. A 2-D toy: index collapse and its cure
#
# 1000 points on two interleaved half-moons, 16 codes started far from them (a small random
# cloud around the origin, shifted away from the data). The codebook learns by gradient descent
# on the commitment loss `misc["loss"]` alone. Three layers, identical except for one argument:
#
# * **plain**: only the codes that some point selects receive a gradient; they move to the data
#   and win ever more points, the others never move;
# * **`affine_lr=1.0`**: all codes share a learned scale and shift, so every code moves with
#   the used ones (Huh et al., 2023);
# * **`replace_freq=10`**: a code unused for 10 steps jumps onto a random data point.
#
# Grey: the data; stars: the codes, filled when used in the last step, hollow when dead.

# %%
points, _ = make_moons(1000, noise=0.08, random_state=0)
points = torch.tensor(points, dtype=torch.float32) * 1.5 + torch.tensor([2.0, 1.5])
toy_recipes = {
    "plain": {},
    "affine_lr=1.0": {"affine_lr": 1.0},
    "replace_freq=10": {"replace_freq": 10},
}
snapshots_at = [0, 10, 50, 300]
snapshots = {}
for name, kwargs in toy_recipes.items():
    torch.manual_seed(0)
    vq = vqfunc.VectorQuantize(2, 16, dim=-1, generator=torch.Generator().manual_seed(0), **kwargs)
    with torch.no_grad():
        vq.codebook.mul_(0.3).sub_(torch.tensor([0.5, 0.5]))
    opt = torch.optim.SGD(vq.parameters(), lr=0.5)
    snapshots[name] = []
    for step in range(snapshots_at[-1] + 1):
        _, misc = vq(points)
        if step in snapshots_at:
            codes = vqfunc.dequantize(vq.params, torch.arange(16), vq.cfg).detach()
            snapshots[name].append((step, codes, misc["histogram"][0] > 0))
        opt.zero_grad()
        misc["loss"].backward()
        opt.step()

fig, axes = plt.subplots(3, 4, figsize=(13, 9.5), sharex=True, sharey=True)
for row, (name, snaps) in enumerate(snapshots.items()):
    for col, (step, codes, used) in enumerate(snaps):
        ax = axes[row, col]
        ax.scatter(points[:, 0], points[:, 1], s=2, c="0.75")
        ax.scatter(*codes[used].T, marker="*", s=160, c="tab:red", edgecolors="k", label="used")
        ax.scatter(
            *codes[~used].T,
            marker="*",
            s=160,
            facecolors="none",
            edgecolors="tab:blue",
            label="dead",
        )
        ax.set_title(f"{name}, step {step}: {int(used.sum())}/16 used", fontsize=10)
        ax.set_aspect("equal")
axes[0, 0].legend(loc="upper left", fontsize=8)
fig.suptitle(
    "The codebook (stars) learning two half-moons (grey): plain, affine, dead-code replacement"
)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. The layer in a model
#
# A small convolutional autoencoder: the encoder maps an 8x8 digit to a 4x4 grid of 16-channel
# vectors, `VectorQuantize` replaces each by one of 64 codes (features on `dim=1`, the channel
# axis, the default), and the decoder maps the codes back to an image. The layer returns
# `(z_q, misc)`; the model passes `misc` on so the training loop can add `misc["loss"]`.

# %%
images = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0
order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
train_x, test_x = images[order[:1500]], images[order[1500:]]


class AutoEncoder(nn.Module):
    def __init__(self, quantizer=None, **vq_kwargs):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 16, 1),
        )
        # 64 codes of 16 features on dim=1, or another quantizer layer built by `quantizer()`
        self.vq = quantizer() if quantizer else vqfunc.VectorQuantize(16, 64, **vq_kwargs)
        self.decoder = nn.Sequential(
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 1, 3, padding=1),
        )

    def forward(self, x):
        z_q, misc = self.vq(self.encoder(x))
        return self.decoder(z_q), misc


model = AutoEncoder()
recon, misc = model(test_x[:2])
print(model.vq)
print(
    "recon",
    tuple(recon.shape),
    "| codes",
    tuple(misc["codes"].shape),
    "| loss",
    misc["loss"].item(),
)


# %% [markdown]
# ## 3. `codebook_warmup`: codes that start where the data are
#
# `codebook_warmup(model, loader)` runs batches through the model and fits every VQ layer's
# codebook to the vectors that reach it: `"data"` draws codes among those vectors, `"kmeans"` runs
# k-means on them. Layers are warmed in the order the forward pass reaches them, so a later layer
# sees the already warmed output of an earlier one. Even before any training, the codes are
# spread over what the (untrained) encoder produces:

# %%
@torch.no_grad()
def test_usage(model):
    model.eval()
    recon, misc = model(test_x)
    model.train()
    hist = misc["histogram"][0]
    return (
        F.mse_loss(recon, test_x).item(),
        vqfunc.perplexity(hist).item(),
        vqfunc.usage(hist).item(),
        hist,
    )


loader = torch.utils.data.DataLoader(train_x, batch_size=64, shuffle=True)
for method in [None, "data", "kmeans"]:
    torch.manual_seed(0)
    model = AutoEncoder()
    if method is not None:
        codebook_warmup(model, loader, warmup_method=method, num_batch=8, progress_bar=False)
    _, ppl, use, _ = test_usage(model)
    print(f"{method or 'no warm-up':>10}: perplexity {ppl:5.1f}, usage {use:.0%} of 64 codes")

# %% [markdown]
# ## 4. The recipe ladder
#
# The same model, data order and number of steps, trained with one more technique at each rung:
#
# | recipe | layer arguments | before training |
# | --- | --- | --- |
# | baseline | | |
# | + data warm-up | | `codebook_warmup(..., "data")` |
# | + k-means warm-up | | `codebook_warmup(..., "kmeans")` |
# | + sync, affine | `sync_nu=0.2, affine_lr=2.0` | k-means |
# | + dead-code replacement | `sync_nu=0.2, affine_lr=2.0, replace_freq=20` | k-means |
# | EMA + replacement | `ema_decay=0.95, replace_freq=20` | k-means |
# | FSQ (4, 4, 4) | `vqfunc.nn.FSQ((4, 4, 4))` between 1x1 convolutions | |
# | LFQ, 6 bits | `vqfunc.nn.LFQ(6, entropy_weight=0.01, commitment_weight=0.01)`, the same | |
# | BSQ, 6 bits | the same with `spherical=True` | |
#
# The last three have no codebook: FSQ rounds 3 features to a grid of 4 values each, LFQ and BSQ
# take the signs of 6 features, 64 codes like the codebook's. Their layers sit between a 1x1
# convolution from the 16 channels down to their features and one back up. LFQ's loss weights
# are scaled down to this task's small reconstruction error (its defaults, 0.1 and 0.25, pin the
# features to their signs here; see the demo's page).
#
# The code-usage histogram of the test digits is recorded along the way.

# %%
class Bottleneck(nn.Module):
    """A quantizer layer of `features` channels between 1x1 convolutions from and to 16."""

    def __init__(self, layer, features):
        super().__init__()
        self.down = nn.Conv2d(16, features, 1)
        self.layer = layer
        self.up = nn.Conv2d(features, 16, 1)

    def forward(self, x):
        z_q, misc = self.layer(self.down(x))
        return self.up(z_q), misc


scaled = {"entropy_weight": 0.01, "commitment_weight": 0.01}
recipes = {
    "baseline": ({}, None),
    "+ data warm-up": ({}, "data"),
    "+ k-means warm-up": ({}, "kmeans"),
    "+ sync, affine": ({"sync_nu": 0.2, "affine_lr": 2.0}, "kmeans"),
    "+ dead-code replacement": ({"sync_nu": 0.2, "affine_lr": 2.0, "replace_freq": 20}, "kmeans"),
    "EMA + replacement": ({"ema_decay": 0.95, "replace_freq": 20}, "kmeans"),
    "FSQ (4, 4, 4)": ({"quantizer": lambda: Bottleneck(vqfunc.nn.FSQ((4, 4, 4)), 3)}, None),
    "LFQ, 6 bits": ({"quantizer": lambda: Bottleneck(vqfunc.nn.LFQ(6, **scaled), 6)}, None),
    "BSQ, 6 bits": (
        {"quantizer": lambda: Bottleneck(vqfunc.nn.LFQ(6, spherical=True, **scaled), 6)},
        None,
    ),
}
STEPS = 300
checkpoints = [0, 50, 150, STEPS]
results = {}
for name, (vq_kwargs, warmup) in recipes.items():
    start = time.perf_counter()
    torch.manual_seed(0)
    model = AutoEncoder(**vq_kwargs)
    gen = torch.Generator().manual_seed(1)
    if warmup is not None:
        warm_loader = torch.utils.data.DataLoader(
            train_x, batch_size=64, shuffle=True, generator=gen
        )
        codebook_warmup(model, warm_loader, warmup_method=warmup, num_batch=8, progress_bar=False)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = {0: test_usage(model)[3]}
    step = 0
    while step < STEPS:
        for x in torch.utils.data.DataLoader(train_x, batch_size=64, shuffle=True, generator=gen):
            recon, misc = model(x)
            loss = F.mse_loss(recon, x) + misc["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step in checkpoints:
                history[step] = test_usage(model)[3]
            if step == STEPS:
                break
    mse, ppl, use, _ = test_usage(model)
    with torch.no_grad():
        recon = model.eval()(test_x[:10])[0]
    results[name] = {
        "mse": mse,
        "perplexity": ppl,
        "usage": use,
        "history": history,
        "recon": recon,
    }
    seconds = time.perf_counter() - start
    print(
        f"{name:24s} test MSE {mse:.4f} | perplexity {ppl:5.1f} | usage {use:4.0%} | {seconds:.0f}s"
    )

# %%
fig, axes = plt.subplots(len(results) + 1, 10, figsize=(10, 1.1 * (len(results) + 1)))
for i in range(10):
    axes[0, i].imshow(test_x[i, 0], cmap="gray_r", vmin=0, vmax=1)
    for row, result in enumerate(results.values(), start=1):
        axes[row, i].imshow(result["recon"][i, 0].clamp(0, 1), cmap="gray_r", vmin=0, vmax=1)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
axes[0, 0].set_ylabel("input", rotation=0, ha="right", va="center")
for row, (name, result) in enumerate(results.items(), start=1):
    axes[row, 0].set_ylabel(
        f"{name}\nMSE {result['mse']:.4f}", rotation=0, ha="right", va="center", fontsize=8
    )
fig.suptitle("Test reconstructions, one row per recipe")
plt.show()

# %% [markdown]
# How the test digits spread over the 64 codes during training (codes sorted by use at the end
# of each column's step), for the baseline, the k-means warm-up alone, and the full recipe
# (k-means, sync, affine and dead-code replacement):

# %%
shown = ["baseline", "+ k-means warm-up", "+ dead-code replacement"]
fig, axes = plt.subplots(len(shown), len(checkpoints), figsize=(13, 2.2 * len(shown)), sharey=True)
for row, name in enumerate(shown):
    for col, step in enumerate(checkpoints):
        hist = results[name]["history"][step]
        ax = axes[row, col]
        ax.bar(range(64), hist.sort(descending=True).values, width=1.0)
        use, ppl = vqfunc.usage(hist), vqfunc.perplexity(hist)
        ax.set_title(f"{name}, step {step}\nusage {use:.0%}, perplexity {ppl:.1f}", fontsize=9)
        ax.set_xticks([])
    axes[row, 0].set_ylabel("test vectors")
plt.tight_layout()
plt.show()

# %% [markdown]
# Without warm-up, one code takes almost every vector at the start and only a handful are ever
# used. Warm-up spreads the codes over the untrained encoder's outputs, but the encoder moves in
# the first steps of training and leaves most codes behind (usage falls, then recovers only in
# part). Dead-code replacement keeps moving unused codes back onto the data, so all 64 stay in
# use and the reconstructions are the best of the ladder, with the affine re-parameterisation
# and the synchronized update doing most of the work before it.
#
# The quantizers without a codebook need no warm-up and no replacement. Here FSQ ends near the
# warmed-up codebooks' error with half of its codes in use, BSQ uses every code but
# reconstructs less well, and LFQ lies between them and the baseline; none of them comes near
# the codebook recipes with dead-code replacement.
#
# `python -m vqfunc.demo` runs a longer version of this ladder.
