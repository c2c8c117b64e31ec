# %% [markdown]
# # vqfunc quickstart
#
# A vector quantizer replaces every vector of a tensor by the nearest of `K` learned **codes**
# (the **codebook**). vqfunc offers it two ways that share one implementation:
#
# * **functional**: `vqfunc.quantize(params, x, cfg)`, a pure function of explicit tensors
#   (`params`) and a static configuration (`cfg`);
# * **as a layer**: `vqfunc.VectorQuantize(...)`, an `nn.Module` that holds the same tensors as
#   parameters.
#
# This notebook quantizes scikit-learn's bundled handwritten digits (1797 images of 8x8 pixels,
# no download) both ways, reads the codes back, measures how the codebook is used, and compares
# Euclidean, cosine and grouped quantizers. It runs in well under a minute on a laptop CPU.

# %%
import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits

import vqfunc

torch.set_num_threads(1)  # the models here are tiny: one CPU thread is the fastest
torch.manual_seed(0)
digits = load_digits()
images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # [1797, 8, 8] in [0, 1]
x = images.reshape(len(images), 64)  # one 64-pixel vector per image
x_train, x_test = x[:1400], x[1400:]
print(x_train.shape, x_test.shape)

# %% [markdown]
# ## 1. Functional: config, params, warm-up, quantize
#
# `VQConfig` is a frozen dataclass of Python values: it decides the code path and never holds
# tensors. `init_params` makes the tensors (a `VQParams` named tuple). A random codebook is a poor
# start, so `warmup_params` fits it to data, here with k-means. Each call returns new params and
# leaves its inputs untouched.
#
# The feature axis is `dim` (default 1, as in vqtorch): for a `[N, 64]` matrix that is the
# 64 pixels.

# %%
cfg = vqfunc.VQConfig(feature_size=64, num_codes=32)
gen = torch.Generator().manual_seed(0)
params = vqfunc.init_params(cfg, generator=gen)
params = vqfunc.warmup_params(params, x_train, cfg, method="kmeans", generator=gen)
print(cfg)
print({name: tuple(t.shape) for name, t in params._asdict().items()})

# %%
z_q, out = vqfunc.quantize(params, x_test, cfg)
print("z_q:", tuple(z_q.shape), z_q.dtype)
print("fields of out:", out._fields)
print("codes:", out.codes[:12].tolist(), "...", tuple(out.codes.shape))
print(f"commitment loss {out.loss.item():.4f}")
print(f"perplexity {out.perplexity.item():.2f} of {cfg.num_codes} codes")

# %% [markdown]
# `out.codes` are integers: 397 digits compressed to 5 bits each. `dequantize` turns codes back
# into vectors: exactly the selected codes `out.codewords`, and the forward value of `z_q` (which is
# computed as `x + (codes - x)` for the straight-through gradient, so equal up to rounding).

# %%
restored = vqfunc.dequantize(params, out.codes, cfg)
print("dequantize(codes) == out.codewords:", torch.equal(restored, out.codewords))
print("dequantize(codes) ~= z_q:", torch.allclose(restored, z_q, atol=1e-6))

fig, axes = plt.subplots(3, 12, figsize=(12, 3.2))
for i in range(12):
    axes[0, i].imshow(x_test[i].reshape(8, 8), cmap="gray_r")
    axes[1, i].imshow(restored[i].reshape(8, 8), cmap="gray_r")
    axes[2, i].text(0.5, 0.5, str(out.codes[i].item()), ha="center", va="center", fontsize=12)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.spines[:].set_visible(False)
axes[0, 0].set_ylabel("input")
axes[1, 0].set_ylabel("decoded")
axes[2, 0].set_ylabel("code")
fig.suptitle("Test digits, their code, and the code's vector (32 codes fitted by k-means)")
plt.show()

# %% [markdown]
# The codebook itself is 32 vectors of 64 pixels; drawn as images, the k-means codes are
# prototype digits.

# %%
fig, axes = plt.subplots(2, 16, figsize=(12, 2.1), layout="constrained")
for k, ax in enumerate(axes.flat):
    ax.imshow(params.codebook[k].reshape(8, 8), cmap="gray_r")
    ax.set_title(str(k), fontsize=8)
    ax.axis("off")
fig.suptitle("The 32 codes of the codebook")
plt.show()

# %% [markdown]
# ## 2. Codebook usage: histogram, perplexity, usage
#
# A codebook is only useful if its codes are used. `out.histogram` counts the rows that chose
# each code (`[num_codebooks, K]`); `perplexity` is `exp(entropy)` of that distribution (from 1
# when one code takes everything up to `K` when all are used equally) and `usage` is the fraction
# of codes used at least once. The same functions work on any codes via `code_histogram`.

# %%
hist = vqfunc.code_histogram(out.codes, cfg.num_codes)
print("histogram equals out.histogram:", torch.equal(hist, out.histogram[0]))
print(f"perplexity {vqfunc.perplexity(hist).item():.2f}, usage {vqfunc.usage(hist).item():.0%}")

random_params = vqfunc.init_params(cfg, generator=torch.Generator().manual_seed(0))
_, out_random = vqfunc.quantize(random_params, x_test, cfg)
hist_random = out_random.histogram[0]

fig, axes = plt.subplots(1, 2, figsize=(11, 2.8), sharey=True)
for ax, h, name in [(axes[0], hist_random, "random codebook"), (axes[1], hist, "k-means codebook")]:
    ax.bar(range(cfg.num_codes), h)
    ax.set_title(
        f"{name}: perplexity {vqfunc.perplexity(h).item():.1f}, usage {vqfunc.usage(h).item():.0%}"
    )
    ax.set_xlabel("code")
axes[0].set_ylabel("test digits")
plt.show()

# %% [markdown]
# ## 3. The same with the layer
#
# `VectorQuantize` takes the fields of `VQConfig` as arguments (vqtorch's names) and returns
# `(z_q, misc)`, where `misc` is a dict of the same outputs (`misc["loss"]` is the commitment
# loss to add to the training loss). `layer.cfg` and `layer.params` lead back to the functional
# form, so both give the same result.

# %%
vq = vqfunc.VectorQuantize(feature_size=64, num_codes=32)
vq.load_params(params)  # or warm it with vqfunc.codebook_warmup(model, loader), see notebook 03
z_q_layer, misc = vq(x_test)
print(vq)
print("misc keys:", sorted(misc))
print("layer == functional:", torch.equal(z_q_layer, z_q) and torch.equal(misc["codes"], out.codes))

# %% [markdown]
# Any rank works, and `dim` says where the features are. Images are `[B, C, H, W]` with the
# channels on `dim=1` (the default): here each 8x8 digit is cut into 2x2 patches, which become
# 4 channels on a 4x4 grid, and every patch is quantized. Codes keep the input's shape minus the
# feature axis. Tokens `[B, N, F]` use `dim=-1`; a single vector `[F]` works too.

# %%
patches = torch.nn.functional.pixel_unshuffle(images[:, None], 2)  # [1797, 4, 4, 4]
vq_patch = vqfunc.VectorQuantize(feature_size=4, num_codes=16)
vqfunc.codebook_warmup(vq_patch, [patches[:1400]], num_batch=1, progress_bar=False)
z_q_patch, misc_patch = vq_patch(patches[1400:])
print("input", tuple(patches[1400:].shape), "-> codes", tuple(misc_patch["codes"].shape))

tokens = patches.flatten(2).transpose(1, 2)  # [1797, 16, 4]: 16 tokens of 4 features
vq_tokens = vqfunc.VectorQuantize(feature_size=4, num_codes=16, dim=-1)
vq_tokens.load_params(vq_patch.params)
_, misc_tokens = vq_tokens(tokens[1400:])
print("tokens", tuple(tokens[1400:].shape), "-> codes", tuple(misc_tokens["codes"].shape))
print(
    "same codes either layout:",
    torch.equal(misc_tokens["codes"].flatten(1), misc_patch["codes"].flatten(1)),
)
print("one vector:", vq_tokens(tokens[0, 0])[1]["codes"])

fig, axes = plt.subplots(2, 10, figsize=(10, 2.3))
decoded = torch.nn.functional.pixel_shuffle(z_q_patch.detach(), 2)[:, 0]
for i in range(10):
    axes[0, i].imshow(images[1400 + i], cmap="gray_r")
    axes[1, i].imshow(decoded[i], cmap="gray_r")
for ax in axes.flat:
    ax.axis("off")
fig.suptitle("Every 2x2 patch replaced by one of 16 patch codes (top: input, bottom: quantized)")
plt.show()

# %% [markdown]
# ## 4. Euclidean, cosine, and groups
#
# Three ways to carve up the space, drawn on a 2-D plane where each colour is one code's cell
# (the plane is a `[300, 300, 2]` grid of points, features last, hence `dim=-1`):
#
# * `dist="euclidean"`: nearest code by distance, the cells are Voronoi polygons;
# * `dist="cosine"`: vectors and codes are normalised first, so only the direction counts and
#   the cells are wedges (with `vector_normalize=True` the output keeps each input's length);
# * `groups=G`: the vector is cut into `G` sub-vectors quantized separately. With `share=False`
#   each group has its own codebook, and `num_codes` counts the codes of all groups together:
#   here 2 groups x 4 codes = 8 codes give a 4 x 4 grid of 16 cells (codes come back as a
#   trailing axis of size `G`, each indexing its group's codebook).

# %%
gen = torch.Generator().manual_seed(3)
cloud = torch.cat(
    [torch.randn(300, 2) * 0.35 + c for c in torch.tensor([[1.5, 1.0], [-1.2, 0.8], [0.0, -1.4]])]
)
grid = torch.stack(
    torch.meshgrid(torch.linspace(-3, 3, 300), torch.linspace(-3, 3, 300), indexing="xy"), -1
)

configs = {
    "euclidean, 16 codes": vqfunc.VQConfig(feature_size=2, num_codes=16, dim=-1),
    "cosine, 16 codes": vqfunc.VQConfig(feature_size=2, num_codes=16, dim=-1, dist="cosine"),
    "groups=2, share=False, 2 x 4 codes": vqfunc.VQConfig(
        feature_size=2, num_codes=8, dim=-1, groups=2, share=False
    ),
}
fig, axes = plt.subplots(1, 3, figsize=(13, 4.4))
for ax, (name, c) in zip(axes, configs.items(), strict=True):
    p = vqfunc.warmup_params(
        vqfunc.init_params(c, generator=gen), cloud, c, method="kmeans", generator=gen
    )
    _, o = vqfunc.quantize(p, grid, c)  # [300, 300, 2] points, features last
    cells = o.codes if c.groups == 1 else o.codes[..., 0] * c.codes_per_book + o.codes[..., 1]
    ax.imshow(
        cells,
        extent=(-3, 3, -3, 3),
        origin="lower",
        cmap="tab20",
        alpha=0.55,
        interpolation="nearest",
    )
    ax.scatter(cloud[:, 0], cloud[:, 1], s=3, c="k", alpha=0.4)
    if c.groups == 1:
        codes = vqfunc.dequantize(p, torch.arange(c.num_codes), c)
        ax.scatter(codes[:, 0], codes[:, 1], marker="*", s=120, c="red", edgecolors="k")
    ax.set_title(name)
    ax.set_xlim(-3, 3)
    ax.set_ylim(-3, 3)
    ax.set_aspect("equal")
fig.suptitle("Cells of three quantizers fitted by k-means to the black points (red stars: codes)")
plt.show()
print("codes of one point with groups=2:", o.codes[150, 150].tolist())


# %% [markdown]
# On the digits, which is better depends on the bit budget. A single Euclidean codebook with
# `K` codes costs `log2 K` bits per vector; with `G` separate codebooks of `k` codes each it
# costs `G log2 k` bits, so groups reach many more bits with tiny codebooks. Below: error on the
# held-out digits for codebooks fitted on the training digits with k-means.

# %%
def test_mse(c):
    p = vqfunc.init_params(c, generator=torch.Generator().manual_seed(0))
    p = vqfunc.warmup_params(
        p, x_train, c, method="kmeans", kmeans_iters=10, generator=torch.Generator().manual_seed(0)
    )
    z, _ = vqfunc.quantize(p, x_test, c)
    return (z - x_test).square().mean().item()


curves = {
    "euclidean": [(b, vqfunc.VQConfig(feature_size=64, num_codes=2**b)) for b in (2, 4, 6, 8)],
    "cosine + vector_normalize": [
        (b, vqfunc.VQConfig(feature_size=64, num_codes=2**b, dist="cosine", vector_normalize=True))
        for b in (2, 4, 6, 8)
    ],
    "groups=4, share=False": [
        (4 * b, vqfunc.VQConfig(feature_size=64, num_codes=4 * 2**b, groups=4, share=False))
        for b in (1, 2, 3)
    ],
    "groups=16, share=False": [
        (16 * b, vqfunc.VQConfig(feature_size=64, num_codes=16 * 2**b, groups=16, share=False))
        for b in (1, 2)
    ],
}
fig, ax = plt.subplots(figsize=(7, 4))
for name, points in curves.items():
    bits, errors = zip(*[(b, test_mse(c)) for b, c in points], strict=True)
    ax.plot(bits, errors, "o-", label=name)
    print(f"{name:28s}", "  ".join(f"{b} bits: {e:.4f}" for b, e in zip(bits, errors, strict=True)))
ax.set_xscale("log", base=2)
ax.set_xlabel("bits per digit")
ax.set_ylabel("test MSE per pixel")
ax.set_title("Quantization error of held-out digits against the bit budget")
ax.legend()
plt.show()

# %% [markdown]
# At the same number of bits one large codebook is the most accurate (its codes can model how
# the pixels vary together), and cosine with `vector_normalize=True` is as good as Euclidean on
# these digits. Groups pay for their independence, but reach bit budgets that no single codebook
# could store: 16 groups of 4 codes spend 32 bits per digit with only 64 stored codes.
#
# Next: notebook 02 trains an autoencoder with these pure functions, `torch.func.grad`, `vmap` and
# `torch.compile`; notebook 03 does it with the layer and shows how to keep every code alive;
# notebook 04 translates vqtorch code line by line.
