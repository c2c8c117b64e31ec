"""Everything compiled or device-specific, behind plain functions of tensors.

- `cpu`: builds and loads the C kernels of `csrc/` (the search, the straight-through output
  and loss) with ctypes; optional, with `available()`.
- `straight_through_cpu`: ctypes wrappers of the straight-through kernels.
- `straight_through`: the autograd node of the straight-through output and commitment loss,
  on the C kernels or in torch.
- `triton_search`, `triton_kernel`: the fused CUDA search in Triton; optional.
- `torch_search`: the pure-torch search that every other backend falls back to.

The core (`vqfunc._search`, `vqfunc._quantize`) imports this package; nothing here imports the
core. Search backends return codes; the core's dispatcher chooses among them and computes the
distances.
"""
