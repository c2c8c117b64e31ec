# %% [markdown]
# # From vqtorch to vqfunc, line by line
#
# vqfunc's layer takes vqtorch's arguments under vqtorch's names, so most vqtorch code runs after
# changing one import. This notebook walks through the usage shown in vqtorch's README and in its
# `examples/` folder (the layer test script, the grouped-affine variant, the autoencoder and
# classifier ladders, the in-place alternating update) and writes each step in vqfunc. Every
# cell states the vqtorch line it replaces in a comment starting with `# vqtorch:`.
#
# What behaves differently, and why, is listed in the migration table (`docs/migration.md`);
# the short version: perplexity is a number, the loss is always a scalar mean, codes of separate
# codebooks index their own group's codebook, any input rank works, and k-means runs on CPU.
#
# The examples use MNIST and CUDA in vqtorch; here they use scikit-learn's bundled digits on
# the CPU (`device` below picks a GPU when there is one) and fewer steps.

# %%
import time

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import nn

import vqfunc

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.set_num_threads(1)  # the models here are tiny: one CPU thread is the fastest
torch.manual_seed(1234)
print("device:", device)

# %% [markdown]
# ## 1. Imports
#
# vqtorch's classes keep their names in vqfunc (`VectorQuant`, `GroupVectorQuant`,
# `ResidualVectorQuant` are aliases of vqfunc's `VectorQuantize`, `VectorQuantize(groups=...)`,
# and `ResidualVectorQuantize`).

# %%
# vqtorch: from vqtorch.nn import VectorQuant, GroupVectorQuant, ResidualVectorQuant
# vqtorch: from vqtorch.inits import codebook_warmup ; from vqtorch import no_vq
from vqfunc import GroupVectorQuant, ResidualVectorQuant, VectorQuant, no_vq
from vqfunc.inits import codebook_warmup

print(VectorQuant is vqfunc.VectorQuantize, issubclass(GroupVectorQuant, vqfunc.VectorQuantize))

# %% [markdown]
# ## 2. The README's layer
#
# The README builds layers with Euclidean or cosine distance, optionally keeping the input's
# norm (`vector_normalize`), optionally in groups, and quantizes a `[B, C, H, W]` feature map on
# its channels (`dim=1`, the default of both libraries). The shapes are smaller here only to
# keep the notebook fast.

# %%
# vqtorch: vq = VectorQuant(feature_size=256, num_codes=512)  (and the variants below)
vq = VectorQuant(feature_size=256, num_codes=512)
vq = VectorQuant(feature_size=256, num_codes=512, dist="cosine")
vq = VectorQuant(feature_size=256, num_codes=512, dist="cosine", vector_normalize=True)
vq = VectorQuant(feature_size=256, num_codes=512, dist="cosine", groups=4)
print(vq)

# vqtorch: vq = VectorQuant(feature_size=32, num_codes=256); z_q, misc = vq(z_e)
vq = VectorQuant(feature_size=32, num_codes=256).to(device)
z_e = torch.randn(1, 32, 16, 16, device=device)
z_q, misc = vq(z_e)
commitment_loss = misc["loss"]
print("z_q", tuple(z_q.shape), "| codes", tuple(misc["q"].shape), "| loss", commitment_loss.shape)
print("perplexity:", misc["perplexity"])  # vqtorch returns None here

# %% [markdown]
# Tokens `[B, N, C]` put the features on `dim=2` (or `dim=-1`). vqfunc also takes inputs of rank
# 1 and 2, which vqtorch refuses (it needs rank >= 3).

# %%
# vqtorch: vq = VectorQuant(feature_size=256, num_codes=512, dim=2)
vq_tokens = VectorQuant(feature_size=256, num_codes=512, dim=2)
print(vq_tokens(torch.randn(2, 10, 256))[1]["q"].shape)

vq_rows = VectorQuant(feature_size=256, num_codes=512, dim=-1)
print(vq_rows(torch.randn(10, 256))[1]["q"].shape, vq_rows(torch.randn(256))[1]["q"].shape)

# %% [markdown]
# ## 3. The example script: every option of `VectorQuant`
#
# vqtorch's example builds a layer with k-means initialisation, affine re-parameterisation,
# synchronized update and dead-code replacement, runs one batch under `torch.no_grad()` to
# trigger the k-means initialisation, then quantizes a fresh batch.
#
# * `kmeans_init=True` fits the codebook with k-means on the first *training* batch. vqtorch
#   needs CUDA for it (torchpq); vqfunc's k-means is plain torch and runs on CPU.
# * vqtorch's `norm=None, cb_norm=None` are its defaults and are simply dropped; vqfunc has no
#   normalisation arguments (normalise in the model, or use `dist="cosine"`).
# * `.cuda()` becomes `.to(device)`.
# * The example uses 1024 codes and inputs of `128 x 8 x 8` vectors; 256 codes and `32 x 8 x 8`
#   vectors here keep the k-means fits of this section to seconds on a CPU.

# %%
# vqtorch: VectorQuant(feature_size=32, num_codes=1024, beta=0.98, kmeans_init=True, norm=None,
#                      cb_norm=None, affine_lr=10.0, sync_nu=0.2, replace_freq=20, dim=-1).cuda()
vq_layer = VectorQuant(
    feature_size=32,  # size of each vector
    num_codes=256,  # codes in the codebook
    beta=0.98,  # commitment trade-off (default 0.95)
    kmeans_init=True,  # k-means on the first training batch
    affine_lr=10.0,  # learning-rate scale of the affine re-parameterisation
    sync_nu=0.2,  # synchronized-update weight
    replace_freq=20,  # replace codes unused for 20 training steps
    dim=-1,  # quantize the last axis
).to(device)

with torch.no_grad():  # the first training-mode batch runs k-means
    z_e = torch.randn(32, 8, 8, 32, device=device)
    vq_layer(z_e)
print("k-means done:", bool(vq_layer.kmeans_initialized))

z_e = torch.randn(32, 8, 8, 32, device=device)
z_q, vq_dict = vq_layer(z_e)
assert z_e.shape == z_q.shape
err = ((z_e - z_q) ** 2).mean().item()
print(f">>> quantization error: {err:.3f}")

# %% [markdown]
# The dead-code counters live in a buffer (`replace_counters`, one per code, counting down from
# `replace_freq`), so they are saved in `state_dict()` with the codebook. vqtorch's
# `lru_replacement(vq, rho, timeout)` helper is the layer argument pair `replace_freq=timeout,
# replace_rho=rho`.

# %%
print(sorted(vq_layer.state_dict()))
print("counters of the first codes:", vq_layer.replace_counters[0, :8].tolist())

# %% [markdown]
# ### Grouped, with separate codebooks
#
# `GroupVectorQuant(groups=4, share=False)` splits each 32-vector into 4 sub-vectors of 8, each
# with its own codebook of `num_codes // groups = 64` codes (`num_codes` counts all groups, as
# in vqtorch). Two differences in the outputs: codes index the group's own codebook (vqtorch
# adds the offset `group * 64`), and the codebook is stored as `[groups, 64, 8]` (vqtorch: 256
# flat rows). Both convert in one line.

# %%
# vqtorch: GroupVectorQuant(feature_size=32, num_codes=1024, beta=0.98, kmeans_init=True,
#          affine_lr=10.0, sync_nu=0.2, replace_freq=20, dim=-1, groups=4, share=False).cuda()
vq_layer = GroupVectorQuant(
    feature_size=32,
    num_codes=256,
    beta=0.98,
    kmeans_init=True,
    affine_lr=10.0,
    sync_nu=0.2,
    replace_freq=20,
    dim=-1,
    groups=4,  # number of sub-vectors
    share=False,  # one codebook per group
).to(device)

with torch.no_grad():
    vq_layer(torch.randn(32, 8, 8, 32, device=device))

z_e = torch.randn(32, 8, 8, 32, device=device)
z_q, vq_dict = vq_layer(z_e)
assert z_e.shape == z_q.shape
err = ((z_e - z_q) ** 2).mean().item()
print(f">>> quantization error: {err:.3f}")

codes = vq_dict["q"]  # [32, 8, 8, 4], each in [0, 64)
per_group = vq_layer.cfg.codes_per_book
vqtorch_codes = codes + torch.arange(4, device=device) * per_group  # vqtorch's flat indices
flat_codebook = vq_layer.codebook.reshape(-1, 8)  # vqtorch's [256, 8] layout
print("codes", tuple(codes.shape), "range", codes.min().item(), "-", codes.max().item())
print("vqtorch-style range", vqtorch_codes.min().item(), "-", vqtorch_codes.max().item())
print("codebook", tuple(vq_layer.codebook.shape), "-> flat", tuple(flat_codebook.shape))

# %% [markdown]
# ### Residual
#
# `ResidualVectorQuant(groups=4)` quantizes the vector, then what is left of it, four times, and
# outputs the sum of the four codes; `groups` is the number of levels (`levels=4` says the same).
# vqfunc's residual layer takes `kmeans_init` (the levels are fitted one after the other on the
# first training batch), `affine_lr`, `sync_nu` and `replace_freq`: with one shared codebook a
# code counts as used when any level picks it, and a dead code is replaced by a residual that
# some level searched (with `share=False`, by one of its own level's residuals). The counters
# are the buffer `replace_counters`, saved in `state_dict()`.

# %%
# vqtorch: ResidualVectorQuant(feature_size=32, num_codes=1024, beta=0.98, kmeans_init=True,
#          affine_lr=10.0, sync_nu=0.2, replace_freq=20, dim=-1, groups=4, share=True).cuda()
vq_layer = ResidualVectorQuant(
    feature_size=32,
    num_codes=256,
    beta=0.98,
    kmeans_init=True,
    affine_lr=10.0,
    sync_nu=0.2,
    replace_freq=20,
    dim=-1,
    groups=4,  # residual levels
    share=True,  # one codebook for all levels
).to(device)
with torch.no_grad():
    vq_layer(torch.randn(32, 8, 8, 32, device=device))

z_e = torch.randn(32, 8, 8, 32, device=device)
z_q, vq_dict = vq_layer(z_e)
assert z_e.shape == z_q.shape
err = ((z_e - z_q) ** 2).mean().item()
print(f">>> quantization error: {err:.3f}")
print("codes per level", tuple(vq_dict["q"].shape), "| residuals", tuple(vq_dict["z_res"].shape))
levels = vq_dict["z_res"].square().mean(dim=(0, 1, 2, 4))
print("mean squared residual after 0..4 levels:", [round(v, 3) for v in levels.tolist()])

# %% [markdown]
# ### Affine groups
#
# vqtorch's experimental variant gives the affine re-parameterisation `affine_groups` blocks of
# codes, each with its own scale and bias. Same argument in vqfunc; the raw parameters are the
# layer's `affine_scale` and `affine_bias` (`[affine_groups, d]`, zero at the start, so a fresh
# layer is unchanged), and the effective codes are `(1 + lr * s) * c + lr * b`.

# %%
# vqtorch: VectorQuant(..., affine_lr=10.0, affine_groups=8, ...)
vq_layer = VectorQuant(
    feature_size=32, num_codes=256, beta=0.98, kmeans_init=True, affine_lr=10.0,
    affine_groups=8, sync_nu=0.2, replace_freq=20, dim=-1,
).to(device)  # fmt: skip
with torch.no_grad():
    vq_layer(torch.randn(32, 8, 8, 32, device=device))
z_e = torch.randn(32, 8, 8, 32, device=device)
z_q, vq_dict = vq_layer(z_e)
print(f">>> quantization error: {((z_e - z_q) ** 2).mean().item():.3f}")
print(
    "affine_scale",
    tuple(vq_layer.affine_scale.shape),
    "affine_bias",
    tuple(vq_layer.affine_bias.shape),
)

# %% [markdown]
# ## 4. The autoencoder ladder (vqtorch's `examples/simple.py`)
#
# The example trains the same small convolutional autoencoder four times: a baseline, then
# adding k-means initialisation, the synchronized update and the affine re-parameterisation,
# and prints the reconstruction loss and the percentage of active codes. The model is
# unchanged; the data are the digits scaled to [-1, 1] (vqtorch: MNIST normalised the same way).
# The training loop changes in two places: no `.cuda()`, and the active percentage reads the
# layer's histogram instead of `q.unique()`.

# %%
digits = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0
digits = (digits - 0.5) / 0.5  # [1797, 1, 8, 8] in [-1, 1]
train_x, test_x = digits[:1500].to(device), digits[1500:].to(device)

lr = 3e-3
train_iter = 250
num_codes = 64
seed = 1234


class SimpleVQAutoEncoder(nn.Module):
    def __init__(self, **vq_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(
            [
                nn.Conv2d(1, 16, kernel_size=3, stride=1, padding=1),
                nn.MaxPool2d(kernel_size=2, stride=2),
                nn.GELU(),
                nn.Conv2d(16, 32, kernel_size=3, stride=1, padding=1),
                nn.MaxPool2d(kernel_size=2, stride=2),
                VectorQuant(32, **vq_kwargs),
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(32, 16, kernel_size=3, stride=1, padding=1),
                nn.GELU(),
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(16, 1, kernel_size=3, stride=1, padding=1),
            ]
        )

    def forward(self, x):
        for layer in self.layers:
            if isinstance(layer, VectorQuant):
                x, vq_dict = layer(x)
            else:
                x = layer(x)
        return x.clamp(-1, 1), vq_dict


def iterate_dataset(x, batch_size=128):
    gen = torch.Generator().manual_seed(seed)
    while True:
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            yield x[idx.to(x.device)]


def train(model, train_iterations=train_iter, alpha=10):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    batches = iterate_dataset(train_x)
    history = []
    for _ in range(train_iterations):
        opt.zero_grad()
        x = next(batches)
        out, vq_out = model(x)
        rec_loss = (out - x).abs().mean()
        cmt_loss = vq_out["loss"]
        (rec_loss + alpha * cmt_loss).backward()
        opt.step()
        active = vqfunc.usage(vq_out["histogram"]).item()  # vqtorch: q.unique().numel() / num_codes
        history.append((rec_loss.item(), active))
    return history


recipes = {
    "baseline": {},
    "+ kmeans init": {"kmeans_init": True},
    "+ synchronized update": {"kmeans_init": True, "sync_nu": 2.0},
    "+ affine parameterization": {"kmeans_init": True, "sync_nu": 2.0, "affine_lr": 2.0},
}
histories, models = {}, {}
for name, kwargs in recipes.items():
    torch.random.manual_seed(seed)
    model = SimpleVQAutoEncoder(num_codes=num_codes, **kwargs).to(device)
    start = time.perf_counter()
    histories[name] = train(model)
    models[name] = model
    model.eval()
    with torch.no_grad():
        out, vq_out = model(test_x)
    test_rec = (out - test_x).abs().mean().item()
    test_active = vqfunc.usage(vq_out["histogram"]).item()
    print(
        f"{name:27s} test rec loss: {test_rec:.3f} | active %: {100 * test_active:5.1f} "
        f"| {time.perf_counter() - start:.1f} s"
    )

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
for name, history in histories.items():
    rec, active = zip(*history, strict=True)
    smooth = torch.tensor(rec).unfold(0, 10, 1).mean(1)
    axes[0].plot(range(9, len(rec)), smooth, label=name)
    axes[1].plot([100 * a for a in active], label=name)
axes[0].set_title("training reconstruction loss (L1, 10-step mean)")
axes[1].set_title("active codes in the batch (%)")
for ax in axes:
    ax.set_xlabel("step")
axes[0].legend()
plt.show()

# %% [markdown]
# ## 5. `no_vq`: the same model without quantization
#
# vqtorch's `no_vq` needs the modules as argument; vqfunc's takes them too, or nothing (then
# every VQ layer is switched off), and restores each layer on exit.

# %%
model = models["+ affine parameterization"]
with torch.no_grad():
    quantized, _ = model(test_x)
    # vqtorch: with vqtorch.no_vq(model):
    with no_vq(model):
        continuous, misc = model(test_x)
print(f"test L1 with VQ {(quantized - test_x).abs().mean():.3f}")
print(f"test L1 without {(continuous - test_x).abs().mean():.3f}")
print("misc inside no_vq:", misc)

# %% [markdown]
# ## 6. Warming a whole model: `codebook_warmup`
#
# Instead of `kmeans_init`, every VQ layer of a model can be warmed from a loader before
# training, in the order the forward pass reaches them.

# %%
# vqtorch: codebook_warmup(model, train_loader, warmup_method='data', num_batch=128)
torch.random.manual_seed(seed)
model = SimpleVQAutoEncoder(num_codes=num_codes).to(device)
train_loader = torch.utils.data.DataLoader(train_x, batch_size=256, shuffle=True)
codebook_warmup(model, train_loader, warmup_method="kmeans", num_batch=4, progress_bar=False)
with torch.no_grad():
    _, vq_out = model.eval()(test_x)
print(
    f"after warm-up, before training: active codes {vqfunc.usage(vq_out['histogram']).item():.0%}"
)

# %% [markdown]
# ## 7. Alternating optimisation with an in-place optimizer (vqtorch's experimental example)
#
# With `inplace_optimizer`, each training forward pass first takes one step of that optimizer
# on the codebook alone (on `mse(sg(z), codes)`), then quantizes with the updated codebook; the
# task loss alone trains the rest. The example runs it on a classifier with `beta=1.0`; the
# functional form of this step is `vqfunc.alternating_step`.

# %%
labels = torch.tensor(load_digits().target)
train_y, test_y = labels[:1500].to(device), labels[1500:].to(device)


class SimpleVQClassifier(nn.Module):
    def __init__(self, **vq_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(
            [
                nn.Conv2d(1, 16, kernel_size=3, stride=1, padding=1),
                nn.MaxPool2d(kernel_size=2, stride=2),
                nn.GELU(),
                nn.Conv2d(16, 32, kernel_size=3, stride=1, padding=1),
                nn.MaxPool2d(kernel_size=2, stride=2),
                VectorQuant(32, **vq_kwargs),
                nn.Conv2d(32, 64, kernel_size=3, stride=1, padding=1),
                nn.AdaptiveMaxPool2d((1, 1)),
                nn.Flatten(),
                nn.Linear(64, 10),
            ]
        )

    def forward(self, x):
        for layer in self.layers:
            if isinstance(layer, VectorQuant):
                x, vq_dict = layer(x)
            else:
                x = layer(x)
        return x, vq_dict


def train_classifier(model, train_iterations=200, alpha=10, ignore_commitment_loss=False):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    criterion = nn.CrossEntropyLoss()
    for _ in range(train_iterations):
        idx = torch.randint(len(train_x), (128,), generator=gen).to(device)
        x, y = train_x[idx], train_y[idx]
        opt.zero_grad()
        out, vq_out = model(x)
        sce_loss = criterion(out, y)
        cmt_loss = vq_out["loss"]
        (sce_loss if ignore_commitment_loss else sce_loss + alpha * cmt_loss).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out, vq_out = model(test_x)
    acc = (out.argmax(dim=1) == test_y).float().mean().item()
    return acc, vqfunc.usage(vq_out["histogram"]).item()


# vqtorch: SimpleVQClassifier(num_codes=num_codes, kmeans_init=True)
torch.random.manual_seed(seed)
model = SimpleVQClassifier(num_codes=num_codes, kmeans_init=True).to(device)
acc, active = train_classifier(model, alpha=50)
print(f"baseline + kmeans init : test accuracy {acc:.1%}, active codes {active:.0%}")


# vqtorch: inplace_optimizer = lambda *args, **kwargs: torch.optim.SGD(*args, **kwargs,
#                                                                     lr=50.0, momentum=0.9)
def inplace_optimizer(params):
    return torch.optim.SGD(params, lr=50.0, momentum=0.9)


torch.random.manual_seed(seed)
model = SimpleVQClassifier(
    num_codes=num_codes, kmeans_init=True, beta=1.0, inplace_optimizer=inplace_optimizer
).to(device)
acc, active = train_classifier(model, ignore_commitment_loss=True)
print(f"+ inplace alt update   : test accuracy {acc:.1%}, active codes {active:.0%}")
