"""Run by .ci/run in a fresh venv holding only the built wheel (and torch), with no C compiler
on PATH: the wheel's compiled CPU kernels load, and a quantize matches the torch path."""

import shutil

import torch

import vqfunc

assert shutil.which("cc") is None and shutil.which("gcc") is None, "a C compiler is on PATH"
entries = {(e.device, e.dtype, e.operation): e for e in vqfunc.kernels.status()}
for operation in ("nearest_codes", "straight_through"):
    entry = entries[("cpu", "float32", operation)]
    print(entry)
    assert entry.backend == "compiled" and "built with the package" in entry.reason, entry

cfg = vqfunc.VQConfig(feature_size=16, num_codes=64, dim=-1)
params = vqfunc.init_params(cfg, generator=torch.Generator().manual_seed(0))
x = torch.randn(500, 16, generator=torch.Generator().manual_seed(1))
z_q, out = vqfunc.quantize(params, x, cfg)
with vqfunc.kernels.use(cpu="torch"):
    want_z_q, want = vqfunc.quantize(params, x, cfg)
assert torch.equal(out.codes, want.codes)
torch.testing.assert_close(z_q, want_z_q)
torch.testing.assert_close(out.loss, want.loss)
# The one library carries every ISA path; each that this CPU runs gives the same codes.
for isa in vqfunc.kernels.CPU_ISA_CHOICES[1:]:
    try:
        with vqfunc.kernels.use(cpu_isa=isa):
            _, forced = vqfunc.quantize(params, x, cfg)
    except RuntimeError as error:
        print(f"{isa}: {error}")
        continue
    assert torch.equal(forced.codes, want.codes), isa
    print(f"{isa}: the same codes")
print("CI: the wheel's compiled kernels load without a compiler and match the torch path")
