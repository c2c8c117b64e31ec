# %% [markdown]
# # From vqtorch to vqfunc: one import line
#
# `vqfunc.vqtorch` is vqtorch's public API (its module tree, names, arguments, defaults,
# attributes, `misc` layout and `state_dict` keys) on vqfunc's functional core. Code written
# for vqtorch migrates by changing its imports and nothing else:
#
# ```python
# import vqtorch                          ->  import vqfunc.vqtorch as vqtorch
# from vqtorch.nn import VectorQuant      ->  from vqfunc.vqtorch.nn import VectorQuant
# ```
#
# This notebook runs vqtorch's README and its `examples/` (the layer test script, the
# grouped-affine variant, the autoencoder and classifier ladders, the in-place alternating
# update) with only that change, then shows the second, optional step: moving to vqfunc's own
# layer, `vqfunc.nn.VectorQuantize`, whose conventions suit new code better. Every cell that
# runs vqtorch code says so in a comment starting with `# vqtorch:`.
#
# The examples use MNIST and CUDA in vqtorch; here they use scikit-learn's bundled digits on
# the CPU (`device` below picks a GPU when there is one) and fewer steps. Both libraries'
# numbers agree step by step: the test suite compares them with records computed by vqtorch.

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
# ## 1. The imports
#
# The package mirrors vqtorch's tree: `vqtorch.nn`, `vqtorch.nn.utils`, `vqtorch.utils`,
# `vqtorch.norms`, `vqtorch.dists`, `vqtorch.math_fns`, and the names vqtorch re-exports at its
# top level.

# %%
# vqtorch: import vqtorch
# vqtorch: from vqtorch.nn import VectorQuant, GroupVectorQuant, ResidualVectorQuant
import vqfunc.vqtorch as vqtorch
from vqfunc.vqtorch.nn import GroupVectorQuant, ResidualVectorQuant, VectorQuant

print(vqtorch.VectorQuant is VectorQuant, vqtorch.nn.utils.lru_replacement, vqtorch.no_vq)

# %% [markdown]
# ## 2. vqtorch's README, as written
#
# The README builds a layer with every option on, runs one batch under `torch.no_grad()` to
# trigger the k-means warm-up, then quantizes a fresh batch. The k-means runs on the CPU (vqtorch
# needs CUDA and torchpq for it). Only `.cuda()` became `.to(device)`.

# %%
# vqtorch: the README's example, with .cuda() -> .to(device)
vq_layer = VectorQuant(
    feature_size=32,  # size of each vector
    num_codes=1024,  # codes in the codebook
    beta=0.98,  # commitment trade-off (default 0.95)
    kmeans_init=True,  # k-means on the first training batch
    norm=None,  # no input normalisation (the default)
    cb_norm=None,  # no codebook normalisation (the default)
    affine_lr=10.0,  # learning-rate scale of the affine re-parameterisation
    sync_nu=0.2,  # weight of the synchronized update
    replace_freq=20,  # replace codes unused for 20 training steps
    dim=-1,  # quantize the last axis (the default is 1)
).to(device)

with torch.no_grad():  # a training-mode pass: the k-means warm-up runs after it
    vq_layer(torch.randn(128, 8, 8, 32).to(device))

z_e = torch.randn(128, 8, 8, 32).to(device)
z_q, vq_dict = vq_layer(z_e)

print(vq_dict.keys())

# %% [markdown]
# Everything vqtorch code reaches into is there: the codebook is an `nn.Embedding`, the affine
# map a submodule `affine_transform`, the codes carry vqtorch's trailing axis, the loss is a
# scalar and the perplexity a number (vqtorch returns `None`), and the state is in vqtorch's
# `state_dict` keys (`_counts` are the dead-code counters, `data_initialized` the k-means flag).

# %%
print("codebook:", vq_layer.codebook, "| affine:", hasattr(vq_layer, "affine_transform"))
print("q", tuple(vq_dict["q"].shape), "| z", tuple(vq_dict["z"].shape), "| d", vq_dict["d"].dtype)
print(f"loss {vq_dict['loss'].item():.4f} | perplexity {vq_dict['perplexity'].item():.1f}")
print("effective codebook:", tuple(vq_layer.get_codebook().shape))
print({k: tuple(v.shape) for k, v in vq_layer.state_dict().items()})

# %% [markdown]
# ## 3. vqtorch's layer test script (`examples/test.py`)
#
# Plain, grouped with separate codebooks, and residual, each with every option on. With
# `share=False`, `misc["q"]` indexes the whole codebook, as in vqtorch: group `g`'s codes are
# rows `g * 256 ... (g + 1) * 256 - 1` of the `[1024, 8]` table.

# %%
# vqtorch: examples/test.py, with .cuda() -> .to(device)
for name, layer in {
    "VectorQuant": VectorQuant(
        feature_size=32, num_codes=1024, beta=0.98, kmeans_init=True, norm=None,
        cb_norm=None, affine_lr=10.0, sync_nu=0.2, replace_freq=20, dim=-1,
    ),
    "GroupVectorQuant": GroupVectorQuant(
        feature_size=32, num_codes=1024, beta=0.98, kmeans_init=True, norm=None,
        cb_norm=None, affine_lr=10.0, sync_nu=0.2, replace_freq=20, dim=-1,
        groups=4, share=False,
    ),
    "ResidualVectorQuant": ResidualVectorQuant(
        feature_size=32, num_codes=1024, beta=0.98, kmeans_init=True, norm=None,
        cb_norm=None, affine_lr=10.0, sync_nu=0.2, replace_freq=20, dim=-1,
        groups=4, share=True,
    ),
}.items():  # fmt: skip
    print(f"Testing {name}")
    vq_layer = layer.to(device)
    with torch.no_grad():
        z_e = torch.randn(128, 8, 8, 32).to(device)
        vq_layer(z_e)
    z_e = torch.randn(128, 8, 8, 32).to(device)
    z_q, vq_dict = vq_layer(z_e)
    assert z_e.shape == z_q.shape
    err = ((z_e - z_q) ** 2).mean().item()
    print(f">>> quantization error: {err:.3f}")
    q = vq_dict["q"].flatten(0, -2)
    ranges = list(zip(q.min(0).values.tolist(), q.max(0).values.tolist(), strict=True))
    print(f"    q {tuple(vq_dict['q'].shape)}, range of each group's codes: {ranges}")

# %% [markdown]
# ### Checkpoints travel both ways
#
# The `state_dict` has vqtorch's keys and shapes, so a checkpoint saved by vqtorch loads with
# `strict=True`, and one saved here loads into vqtorch.

# %%
restored = ResidualVectorQuant(
    32, 1024, 4, True, kmeans_init=True, affine_lr=10.0, replace_freq=20, dim=-1
).to(device)
restored.load_state_dict(vq_layer.state_dict(), strict=True)
restored.eval(), vq_layer.eval()
with torch.no_grad():
    print("same output:", torch.equal(restored(z_e)[0], vq_layer(z_e)[0]))

# %% [markdown]
# ## 4. The autoencoder ladder (`examples/autoencoder.py`)
#
# The example trains the same small convolutional autoencoder four times: a baseline, then with
# k-means initialisation, the synchronized update and the affine re-parameterisation, and
# prints the reconstruction loss and the percentage of active codes. The model and the training
# loop are vqtorch's; the data are the digits scaled to [-1, 1] (vqtorch: MNIST normalised the
# same way), and the loop runs a fixed number of steps.

# %%
digits = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0
digits = (digits - 0.5) / 0.5  # [1797, 1, 8, 8] in [-1, 1]
labels = torch.tensor(load_digits().target)
train_dataset = torch.utils.data.DataLoader(
    torch.utils.data.TensorDataset(digits[:1500], labels[:1500]), batch_size=256, shuffle=True
)
test_x, test_y = digits[1500:].to(device), labels[1500:].to(device)

lr = 3e-3
train_iter = 200
num_codes = 64
seed = 1234


# vqtorch: examples/autoencoder.py's model
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
            if isinstance(layer, (VectorQuant, vqfunc.nn.VectorQuantize)):
                x, vq_dict = layer(x)
            else:
                x = layer(x)
        return x.clamp(-1, 1), vq_dict


# vqtorch: examples/autoencoder.py's training loop (progress bar -> history)
def train(model, train_loader, train_iterations=1000, alpha=10):
    def iterate_dataset(data_loader):
        data_iter = iter(data_loader)
        while True:
            try:
                x, y = next(data_iter)
            except StopIteration:
                data_iter = iter(data_loader)
                x, y = next(data_iter)
            yield x.to(device), y.to(device)

    history = []
    for _ in range(train_iterations):
        opt.zero_grad()
        x, _ = next(iterate_dataset(train_loader))
        out, vq_out = model(x)
        rec_loss = (out - x).abs().mean()
        cmt_loss = vq_out["loss"]
        (rec_loss + alpha * cmt_loss).backward()
        opt.step()
        history.append((rec_loss.item(), vq_out["q"].unique().numel() / num_codes * 100))
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
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    start = time.perf_counter()
    histories[name] = train(model, train_dataset, train_iterations=train_iter)
    models[name] = model
    with torch.no_grad():
        out, vq_out = model.eval()(test_x)
    active = vq_out["q"].unique().numel() / num_codes * 100
    print(
        f"{name:27s} test rec loss: {(out - test_x).abs().mean():.3f} | active %: {active:5.1f}"
        f" | {time.perf_counter() - start:.1f} s"
    )

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
for name, history in histories.items():
    rec, active = zip(*history, strict=True)
    axes[0].plot(range(9, len(rec)), torch.tensor(rec).unfold(0, 10, 1).mean(1), label=name)
    axes[1].plot(active, label=name)
axes[0].set_title("training reconstruction loss (L1, 10-step mean)")
axes[1].set_title("active codes in the batch (%)")
for ax in axes:
    ax.set_xlabel("step")
axes[0].legend()
plt.show()

# %% [markdown]
# ## 5. `no_vq`: the same model without quantization
#
# vqtorch's calling convention: the modules as argument, the VQ layers switched off (`enabled`)
# inside the block. Without an argument, as vqtorch's README writes it (vqtorch itself then
# raises), every VQ layer is switched off.

# %%
model = models["+ affine parameterization"]
with torch.no_grad():
    quantized, _ = model(test_x)
    # vqtorch: with vqtorch.no_vq(model):
    with vqtorch.no_vq(model):
        continuous, misc = model(test_x)
    with vqtorch.no_vq():
        assert model(test_x)[1] == {}
print(f"test L1 with VQ {(quantized - test_x).abs().mean():.3f}")
print(f"test L1 without {(continuous - test_x).abs().mean():.3f}")
print("misc inside no_vq:", misc, "| enabled again:", model.layers[5].enabled)

# %% [markdown]
# ## 6. The in-place alternating update (`examples/experimental_inplace_update.py`)
#
# With `inplace_optimizer`, each training forward pass searches the codes, takes one step of
# that optimizer on the codebook alone (on `mse(sg(z), C[q])`), and returns the updated codes
# of the same assignments; the task loss alone trains the rest. vqtorch requires `beta=1.0`.


# %%
class SimpleVQClassifier(nn.Module):  # vqtorch: examples/classification.py's model
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


def train_classifier(model, train_iterations=150, alpha=10, ignore_commitment_loss=False):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    batches = iter(train_dataset)
    for _ in range(train_iterations):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(train_dataset)
            x, y = next(batches)
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        out, vq_out = model(x)
        sce_loss = criterion(out, y)
        cmt_loss = vq_out["loss"]
        (sce_loss if ignore_commitment_loss else sce_loss + alpha * cmt_loss).backward()
        opt.step()
    with torch.no_grad():
        out, vq_out = model.eval()(test_x)
    acc = (out.argmax(dim=1) == test_y).float().mean().item()
    return acc, vq_out["q"].unique().numel() / num_codes


torch.random.manual_seed(seed)
model = SimpleVQClassifier(num_codes=num_codes, kmeans_init=True).to(device)
acc, active = train_classifier(model, alpha=50)
print(f"baseline + kmeans init : test accuracy {acc:.1%}, active codes {active:.0%}")

# vqtorch: inplace_optimizer = lambda *args, **kwargs: torch.optim.SGD(*args, **kwargs, lr=50.0,
#                                                                     momentum=0.9)
inplace_optimizer = lambda *args, **kwargs: torch.optim.SGD(  # noqa: E731
    *args, **kwargs, lr=50.0, momentum=0.9
)
torch.random.manual_seed(seed)
model = SimpleVQClassifier(
    num_codes=num_codes, kmeans_init=True, beta=1.0, inplace_optimizer=inplace_optimizer
).to(device)
acc, active = train_classifier(model, ignore_commitment_loss=True)
print(f"+ inplace alt update   : test accuracy {acc:.1%}, active codes {active:.0%}")

# %% [markdown]
# ## 7. The optional second step: vqfunc's own layer
#
# `vqfunc.nn.VectorQuantize` takes the same arguments under the same names (except `norm` and
# `cb_norm`: normalise in the model, or use `dist="cosine"`), and keeps vqfunc's conventions:
# codes without vqtorch's trailing axis, group-local codes with `share=False` and a
# `[groups, K, d]` codebook, the counters and the k-means flag as named buffers, a `mask=`
# argument, EMA codebooks, the functional form (`layer.cfg`, `layer.params`) and
# `torch.distributed`. The migration table in `docs/migration.md` lists every difference.
#
# A vqtorch codebook moves over by reshaping `codebook.weight` into `cfg.codebook_shape`; the
# codes then differ only by the group offset.

# %%
compat = GroupVectorQuant(32, 256, 4, False, dim=-1).to(device)
native = vqfunc.nn.VectorQuantize(32, 256, groups=4, share=False, dim=-1).to(device)
native.load_params(
    native.params._replace(codebook=compat.codebook.weight.reshape(native.cfg.codebook_shape))
)
x = torch.randn(16, 32, device=device)
z_q_compat, misc_compat = compat(x)
z_q_native, misc_native = native(x)
offsets = torch.arange(4, device=device) * native.cfg.codes_per_book
print("same output:", torch.equal(z_q_compat, z_q_native))
print("codes: vqtorch", tuple(misc_compat["q"].shape), "| vqfunc", tuple(misc_native["q"].shape))
print("same codes up to the offset:", torch.equal(misc_compat["q"], misc_native["q"] + offsets))
print("read-only views of the configuration:", native.num_codes, native.groups, native.beta)

# %% [markdown]
# The autoencoder of section 4 with vqfunc's layer, the codebook warmed from data before
# training with `codebook_warmup` (vqtorch's name for it), instead of `kmeans_init`:

# %%
from vqfunc.inits import codebook_warmup

torch.random.manual_seed(seed)
model = SimpleVQAutoEncoder(num_codes=num_codes)
model.layers[5] = vqfunc.nn.VectorQuantize(32, num_codes=num_codes, sync_nu=2.0, affine_lr=2.0)
model = model.to(device)
loader = torch.utils.data.DataLoader(digits[:1500].to(device), batch_size=256, shuffle=True)
codebook_warmup(model, loader, warmup_method="kmeans", num_batch=4, progress_bar=False)
opt = torch.optim.AdamW(model.parameters(), lr=lr)
native_history = train(model, train_dataset, train_iterations=train_iter)
with torch.no_grad():
    out, vq_out = model.eval()(test_x)
print(
    f"vqfunc.nn.VectorQuantize    test rec loss: {(out - test_x).abs().mean():.3f} | "
    f"active %: {100 * vqfunc.usage(vq_out['histogram']).item():5.1f}"
)
