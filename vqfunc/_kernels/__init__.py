"""Everything compiled or device-specific, behind plain functions of tensors.

- `policy`: the one place that decides which backend runs (read from the environment once,
  changed with `vqfunc.kernels.use`, reported by `vqfunc.kernels.status()`).
- `build`: how the C kernels of `csrc/` are compiled, shared by `setup.py` (the package build)
  and `cpu` (the first-use build).
- `cpu`: loads the C kernels (the search, the straight-through output and loss) with ctypes,
  from the package or a verified cache; optional, with `available()`.
- `straight_through_cpu`: ctypes wrappers of the straight-through kernels.
- `fused_forward_cpu`: ctypes wrapper of quantize's one pass after the search (validity, the
  outputs, the loss and the histogram), used by the operator of `vqfunc._fused_quantize`.
- `straight_through`: the custom operators of the straight-through output and commitment loss,
  on the C kernels or in torch.
- `triton_search`, `triton_kernel`: the fused CUDA search in Triton; optional.
- `torch_search`: the pure-torch search that every other backend falls back to.

The core (`vqfunc._search`, `vqfunc._quantize`) imports this package; nothing here imports the
core. Search backends return codes; the core's dispatcher chooses among them and computes the
distances.
"""
