# %% [markdown]
# # One model, three bitrates: residual VQ with quantizer dropout
#
# A residual quantizer's codes are a prefix code: the first `n` levels alone decode to a
# coarser version of the vector. Neural codecs (SoundStream, EnCodec, DAC) use this to serve
# several bitrates from one model, and train for it with **quantizer dropout**: in training,
# the output sums only a random number of levels, so the decoder learns to work from every
# prefix.
#
# This notebook trains a small autoencoder on scikit-learn's 8x8 digits with a
# `vqfunc.ResidualVectorQuantize` of six levels with codebooks of decreasing size, once with
# DAC's quantizer dropout and once without, then decodes the test images from the first 1, 3
# and 6 levels of their codes (`n_levels=`), and measures the bits each image takes with
# `vqfunc.residual.bitrate`.

# %%
import time

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import nn

import vqfunc

torch.set_num_threads(1)  # the model is tiny: one CPU thread is the fastest
digits = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0  # [1797, 64] in [0, 1]
train, test = digits[:1500], digits[1500:]

SIZES = (64, 32, 32, 16, 16, 16)  # codes per level
DEPTHS = (1, 3, 6)  # the bitrates shown

# %% [markdown]
# ## The model
#
# An MLP encoder to 16 features, the residual quantizer, an MLP decoder. One vector per image,
# so `bitrate(cfg, frame_rate=1)` is the number of bits per image: `log2(64) + log2(32) + ...`.
# With `quantizer_dropout=0.5` (and the default `dropout_per="sample"`, DAC's rule) half of
# every training batch takes a random depth in `[1, 6]`, the other half all six levels.


# %%
class Codec(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 16))
        self.vq = vqfunc.ResidualVectorQuantize(
            16, SIZES, levels=len(SIZES), share=False, dim=-1, kmeans_init=True,
            replace_freq=20, quantizer_dropout=dropout, dropout_seed=0,
        )  # fmt: skip
        self.dec = nn.Sequential(nn.Linear(16, 128), nn.GELU(), nn.Linear(128, 64))

    def forward(self, x: torch.Tensor, n_levels: int | None = None):
        z_q, misc = self.vq(self.enc(x), n_levels=n_levels)
        return self.dec(z_q), misc


def fit(dropout: float, steps: int = 600) -> Codec:
    torch.manual_seed(0)
    model = Codec(dropout)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    order = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = train[torch.randint(0, len(train), (128,), generator=order)]
        x_hat, misc = model(x)
        loss = (x_hat - x).square().mean() + 0.25 * misc["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


start = time.perf_counter()
models = {"quantizer dropout 0.5": fit(0.5), "no dropout": fit(0.0)}
print(f"trained two models in {time.perf_counter() - start:.1f} s")

# %% [markdown]
# ## Error against bitrate
#
# Each model decodes the held-out images from the first `n` levels of their codes. The codes
# of `n` levels are the first `n` of the full codes, so one encoding serves every bitrate.

# %%
cfg = models["no dropout"].vq.cfg
bits = {n: vqfunc.residual.bitrate(cfg, frame_rate=1, n_levels=n) for n in range(1, 7)}
errors = {}
with torch.no_grad():
    for name, model in models.items():
        errors[name] = {n: float((model(test, n_levels=n)[0] - test).square().mean()) for n in bits}
print("bits/image " + " ".join(f"{bits[n]:6.0f}" for n in bits))
for name, row in errors.items():
    print(f"{name:>21} " + " ".join(f"{row[n]:.4f}" for n in bits))

# %% [markdown]
# ## Reconstructions at three bitrates from one model

# %%
model = models["quantizer dropout 0.5"]
shown = test[:8]
with torch.no_grad():
    rows = {"original": shown}
    for n in DEPTHS:
        rows[f"{bits[n]:.0f} bits ({n} level{'s' if n > 1 else ''})"] = model(shown, n_levels=n)[0]
fig = plt.figure(figsize=(10, 5.2))
grid = fig.add_gridspec(len(rows), 2, width_ratios=(1.6, 1.0), wspace=0.25)
for r, (title, images) in enumerate(rows.items()):
    strip = images.clamp(0, 1).reshape(-1, 8, 8).permute(1, 0, 2).reshape(8, -1)
    ax = fig.add_subplot(grid[r, 0])
    ax.imshow(strip, cmap="gray_r", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_ylabel(title, rotation=0, ha="right", va="center", fontsize=9)
curve = fig.add_subplot(grid[:, 1])
for name, row in errors.items():
    curve.plot([bits[n] for n in row], list(row.values()), marker="o", label=name)
for n in DEPTHS:
    curve.axvline(bits[n], color="grey", lw=0.5, ls=":")
curve.set_xlabel("bits per image (vqfunc.residual.bitrate)")
curve.set_ylabel("test MSE")
curve.set_title("one model, every prefix of the levels")
curve.legend()
plt.show()

# %% [markdown]
# Without dropout the decoder only ever sees the sum of all six levels, so the same codes cut
# after one or three levels decode worse; with quantizer dropout the decoder has learnt every
# prefix, and its error at full depth stays close to that of the model trained without it.
# The training above ran the layer's own draws (`dropout_generator`, seeded by `dropout_seed`);
# under `torch.compile(fullgraph=True)` draw the depths outside the graph with
# `vqfunc.residual.draw_dropout` and pass them as `layer(x, depth=...)`.
