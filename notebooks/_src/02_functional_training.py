# %% [markdown]
# # Functional training: `torch.func.grad`, `optree`, explicit state, `vmap`, `torch.compile`
#
# vqfunc's core is a set of pure functions: `quantize(params, x, cfg)` reads tensors and returns
# new ones, and the training state of a codebook (EMA statistics, dead-code counters) is an
# explicit record that goes in and comes out. That is what lets a training step be written the
# JAX way, as a function from old weights to new weights, and then be transformed:
# differentiated with `torch.func.grad`, batched with `torch.func.vmap`, compiled with
# `torch.compile`.
#
# This notebook trains a small VQ autoencoder on scikit-learn's digits that way: each 8x8 digit
# is encoded into 4 latent vectors of size 8, each quantized with a codebook of 32 codes, and
# decoded back.

# %%
import time

import matplotlib.pyplot as plt
import optree
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call, grad, vmap

import vqfunc

torch.set_num_threads(1)  # the models here are tiny: one CPU thread is the fastest
torch.manual_seed(0)
x_all = torch.tensor(load_digits().images, dtype=torch.float32).reshape(-1, 64) / 16.0
x_train, x_test = x_all[:1500], x_all[1500:]
TOKENS, D = 4, 8  # latent: 4 vectors of 8 features per digit

# %% [markdown]
# ## 1. A pure model
#
# The encoder and decoder are ordinary modules used only as *templates*: their weights live in a
# plain dict (a pytree), and `functional_call` runs a module with the weights it is given. The
# quantizer's params (`VQParams`, a named tuple) sit in the same tree.

# %%
encoder = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, TOKENS * D))
decoder = nn.Sequential(nn.Linear(TOKENS * D, 128), nn.ReLU(), nn.Linear(128, 64))


def init_weights(cfg, seed):
    torch.manual_seed(seed)
    for module in (*encoder, *decoder):
        if isinstance(module, nn.Linear):
            module.reset_parameters()
    return {
        "encoder": {k: v.detach().clone() for k, v in encoder.named_parameters()},
        "decoder": {k: v.detach().clone() for k, v in decoder.named_parameters()},
        "vq": vqfunc.init_params(cfg, generator=torch.Generator().manual_seed(seed)),
    }


def forward(weights, x, cfg):
    z = functional_call(encoder, weights["encoder"], (x,)).reshape(-1, TOKENS, D)
    z_q, out = vqfunc.quantize(weights["vq"], z, cfg)
    recon = functional_call(decoder, weights["decoder"], (z_q.reshape(-1, TOKENS * D),))
    return recon, out


cfg = vqfunc.VQConfig(feature_size=D, num_codes=32, dim=-1)
weights = init_weights(cfg, seed=0)
recon, out = forward(weights, x_train[:5], cfg)
print("recon", tuple(recon.shape), "| codes", tuple(out.codes.shape))
print(optree.tree_map(lambda t: tuple(t.shape), weights))


# %% [markdown]
# ## 2. A training step: `grad` for the gradient, `optree` for the update
#
# The loss returns the quantizer's output as auxiliary data (`has_aux=True`), so the step can
# log it and feed it to the state update below. The optimizer is Adam written over pytrees in a
# few lines with `optree.tree_map`: weights, gradients and moments are trees of the same shape.

# %%
def adam_init(weights):
    zeros = optree.tree_map(torch.zeros_like, weights)
    return {"m": zeros, "v": optree.tree_map(torch.zeros_like, weights), "t": 0}


def adam_update(weights, grads, opt, lr=3e-3, b1=0.9, b2=0.999, eps=1e-8):
    t = opt["t"] + 1
    m = optree.tree_map(lambda m, g: b1 * m + (1 - b1) * g, opt["m"], grads)
    v = optree.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, opt["v"], grads)
    step = lambda w, m, v: w - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)  # noqa: E731
    return optree.tree_map(step, weights, m, v), {"m": m, "v": v, "t": t}


def loss_fn(weights, x, cfg):
    recon, out = forward(weights, x, cfg)
    rec = (recon - x).square().mean()
    return rec + out.loss, (rec, out)


def train_step(weights, opt, x, cfg):
    grads, (rec, out) = grad(loss_fn, has_aux=True)(weights, x, cfg)
    weights, opt = adam_update(weights, grads, opt)
    return weights, opt, rec, out


def batches(seed, batch_size=128):
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield from x_train[torch.randperm(len(x_train), generator=gen)].split(batch_size)


def test_metrics(weights, vq_params, cfg):
    recon, out = forward({**weights, "vq": vq_params}, x_test, cfg)
    return (recon - x_test).square().mean().item(), vqfunc.usage(out.histogram).mean().item()


STEPS = 400
weights, opt = init_weights(cfg, seed=0), None
opt = adam_init(weights)
log_grad = []
data = batches(seed=0)
start = time.perf_counter()
for _ in range(STEPS):
    weights, opt, rec, out = train_step(weights, opt, next(data), cfg)
    log_grad.append((rec.item(), vqfunc.usage(out.histogram).item()))
mse, use = test_metrics(weights, weights["vq"], cfg)
print(f"{STEPS} steps in {time.perf_counter() - start:.1f} s")
print(f"test MSE {mse:.4f}, code usage {use:.0%}")

# %% [markdown]
# The codebook started as random normal vectors, away from the encoder's outputs. The
# commitment loss only pulls the codes that are *selected* towards their inputs, so those codes
# win ever more vectors while the others never move: part of the codebook stays dead (the usage
# printed above), the beginning of index collapse. The cure needs state that lives across steps.
#
# ## 3. State threaded explicitly: EMA codebook and dead-code replacement
#
# With `ema_decay > 0` the codebook follows running averages of the vectors assigned to each
# code (as in VQ-VAE), and with `replace_freq > 0` a code unused for that many steps is moved
# onto a random vector of the batch. Both keep their statistics in a `VQState` record:
# `init_state` makes it, `update_state` is the pure transition
# `(params, state, out) -> (params, state)`. Nothing is hidden in a module; the step below
# takes the state in and gives it back.
#
# The codebook is now moved by the averages, not by the gradient, so the gradient is taken with
# respect to the encoder and decoder only; the encoder still gets the commitment term.

# %%
cfg_ema = vqfunc.VQConfig(feature_size=D, num_codes=32, dim=-1, ema_decay=0.9, replace_freq=10)


def loss_ema(net, vq_params, x, cfg):
    recon, out = forward({**net, "vq": vq_params}, x, cfg)
    rec = (recon - x).square().mean()
    commit = vqfunc.commitment_loss(out.z, out.codewords, beta=0.0)  # pulls the encoder only
    return rec + 0.25 * commit, (rec, out)


def train_step_ema(net, vq_params, vq_state, opt, x, cfg, generator):
    grads, (rec, out) = grad(loss_ema, has_aux=True)(net, vq_params, x, cfg)
    net, opt = adam_update(net, grads, opt)
    vq_params, vq_state = vqfunc.update_state(vq_params, vq_state, out, cfg, generator=generator)
    return net, vq_params, vq_state, opt, rec, out


weights = init_weights(cfg_ema, seed=0)
vq_params = weights.pop("vq")
net = weights
vq_state = vqfunc.init_state(vq_params, cfg_ema)
# One record per technique: VQState(ema=EMAState(counts, sums), replace=ReplaceState(counters)).
print(
    {
        f"{technique}.{name}": tuple(t.shape)
        for technique, record in vq_state._asdict().items()
        for name, t in record._asdict().items()
    }
)

opt = adam_init(net)
gen = torch.Generator().manual_seed(0)
log_ema = []
data = batches(seed=0)
start = time.perf_counter()
for _ in range(STEPS):
    net, vq_params, vq_state, opt, rec, out = train_step_ema(
        net, vq_params, vq_state, opt, next(data), cfg_ema, gen
    )
    log_ema.append((rec.item(), vqfunc.usage(out.histogram).item()))
mse, use = test_metrics(net, vq_params, cfg_ema)
print(f"{STEPS} steps in {time.perf_counter() - start:.1f} s")
print(f"test MSE {mse:.4f}, code usage {use:.0%}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
for name, log in [("gradient codebook", log_grad), ("EMA + dead-code replacement", log_ema)]:
    rec, use = zip(*log, strict=True)
    axes[0].plot(torch.tensor(rec).unfold(0, 10, 1).mean(1), label=name)
    axes[1].plot([100 * u for u in use], label=name)
axes[0].set_yscale("log")
axes[0].set_title("training reconstruction MSE (10-step mean)")
axes[1].set_title("codes used in the batch (%)")
for ax in axes:
    ax.set_xlabel("step")
axes[1].legend()
plt.show()

# %% [markdown]
# On this small problem both reconstruct about equally well, but only the state-threaded
# codebook puts all of its 32 codes to work.

# %% [markdown]
# ## 4. `vmap`: several codebooks trained at once
#
# Because a step is a pure function of tensors, `torch.func.vmap` runs it for a whole stack of
# codebooks in one call. Here eight codebooks learn the trained encoder's latent vectors by
# gradient descent on the codebook term of the loss (`beta=1`), each with its own learning
# rate: a learning-rate sweep in a single batched step. The stack is a `VQParams` whose tensors
# have a leading axis of 8; the data are shared (`in_dims=None`).

# %%
with torch.no_grad():
    latents = functional_call(encoder, net["encoder"], (x_train,)).reshape(-1, D)
cfg_cb = vqfunc.VQConfig(feature_size=D, num_codes=32, dim=-1, beta=1.0)


def codebook_step(params, z, lr):
    g = grad(lambda p: vqfunc.quantize(p, z, cfg_cb)[1].loss)(params)
    return optree.tree_map(lambda p, d: p - lr * d, params, g)


def quantization_error(params, z):
    return vqfunc.quantize(params, z, cfg_cb)[1].loss


lrs = torch.logspace(0, 2.5, 8)  # 1 to 316
seeds = [vqfunc.init_params(cfg_cb, generator=torch.Generator().manual_seed(i)) for i in range(8)]
start_params = vqfunc.warmup_params(
    seeds[0], latents, cfg_cb, generator=torch.Generator().manual_seed(0)
)
stack = optree.tree_map(lambda *ts: torch.stack(ts), *[start_params] * 8)  # same start, 8 copies

sweep_step = vmap(codebook_step, in_dims=(0, None, 0))
sweep_error = vmap(quantization_error, in_dims=(0, None))

# One vmapped step equals eight separate steps.
batch = latents[:512]
looped = [codebook_step(vqfunc.VQParams(*(t[i] for t in stack)), batch, lrs[i]) for i in range(8)]
batched = sweep_step(stack, batch, lrs)
print(
    "vmap == loop:",
    all(torch.allclose(batched.codebook[i], looped[i].codebook, atol=1e-6) for i in range(8)),
)

curves = [sweep_error(stack, latents)]
gen = torch.Generator().manual_seed(0)
for _ in range(150):
    idx = torch.randint(len(latents), (512,), generator=gen)
    stack = sweep_step(stack, latents[idx], lrs)
    curves.append(sweep_error(stack, latents))
curves = torch.stack(curves)  # [steps + 1, 8]

fig, ax = plt.subplots(figsize=(7, 3.8))
for i, lr in enumerate(lrs):
    ax.plot(curves[:, i], label=f"lr {lr:.0f}", color=plt.cm.viridis(i / 7))
ax.set_yscale("log")
ax.set_ylim(top=2 * curves[0].max().item())  # a diverging run leaves the chart
ax.set_xlabel("step")
ax.set_ylabel("mean squared quantization error")
ax.set_title("Eight codebooks trained by one vmapped step, one learning rate each")
ax.legend(ncol=2, fontsize=8)
plt.show()
final = curves[-1]
print(
    "final error per learning rate:",
    {f"{lr:.0f}": round(e, 4) for lr, e in zip(lrs.tolist(), final.tolist(), strict=True)},
)
print(f"best learning rate: {lrs[final.argmin()]:.0f}")


# %% [markdown]
# The loss is a mean over all elements, so the gradient of one code is small (it is scaled by
# the share of vectors the code wins): small learning rates barely move the codes, the useful
# ones are in the tens, and the largest of the sweep diverges (its curve leaves the chart).
#
# ## 5. `torch.compile` of the step
#
# `quantize` is written without host synchronisations (no `.item()`, no data-dependent Python
# branches), so the whole gradient step of section 2, `grad` and the `optree` update included,
# compiles into one graph. The first call compiles (some seconds on a laptop CPU); later calls
# with new data of the same shape reuse the compiled code.

# %%
def sgd_step(weights, x):
    grads, (rec, _) = grad(loss_fn, has_aux=True)(weights, x, cfg)
    return optree.tree_map(lambda w, g: w - 0.1 * g, weights, grads), rec


compiled_step = torch.compile(sgd_step)
weights = init_weights(cfg, seed=1)
x = x_train[:128]
start = time.perf_counter()
new_compiled, rec_compiled = compiled_step(weights, x)
print(f"first call (compiles): {time.perf_counter() - start:.1f} s")
new_eager, rec_eager = sgd_step(weights, x)
same = optree.tree_all(
    optree.tree_map(lambda a, b: torch.allclose(a, b, atol=1e-5), new_compiled, new_eager)
)
print("compiled step == eager step:", same, f"(loss {rec_compiled:.5f} vs {rec_eager:.5f})")

start = time.perf_counter()
for batch in x_train[128:1408].split(128):
    weights, rec = compiled_step(weights, batch)
print(f"10 more compiled steps on new data: {time.perf_counter() - start:.2f} s, loss {rec:.4f}")
