"""Which backend runs, and how to choose it.

vqfunc has two hot paths with compiled implementations: the nearest-code search and the fused
straight-through output with its commitment loss. On CPU, float32 tensors go to C kernels
(AVX-512, AVX2 + FMA or portable C, chosen from the CPU's features; OpenMP), built when the
package is built or, failing that, on first use with the system C compiler; everything else
runs in torch. On CUDA torch is the default; the fused Triton search runs only when asked for,
until a GPU benchmark has shown it ahead of torch.

Initial choices come from the environment, read once at import:

- `VQFUNC_CPU_KERNEL=1` (default): the compiled kernels when they build and load, else torch
  with a warning (once); `0`: torch; `require`: the compiled kernels or an error.
- `VQFUNC_CPU_ISA=auto` (default): the fastest ISA path of the C kernels this CPU runs;
  `amx` (the search's scores on the AMX tiles, exact), `avx512`, `avx2` or `portable` (plain C,
  any CPU) force one (a path the CPU lacks is an error).
- `VQFUNC_TRITON=0` (default): torch on CUDA; `1`: the Triton search when Triton imports.

`use` changes them for a `with` block (the setting is process-wide, not per thread), and
`status` says what runs where and why:

```python
import vqfunc

for entry in vqfunc.kernels.status():
    print(entry)  # e.g. "cpu float32 nearest_codes: compiled (float32, built into ...)"

with vqfunc.kernels.use(cpu="torch"):
    out = vqfunc.quantize(z, params, cfg)  # the pure-torch path
```
"""

from __future__ import annotations

from vqfunc._kernels.policy import (
    CPU_CHOICES,
    CPU_ISA_CHOICES,
    CUDA_CHOICES,
    Backend,
    Settings,
    settings,
    use,
)
from vqfunc._kernels.policy import describe as _describe

__all__ = [
    "CPU_CHOICES",
    "CPU_ISA_CHOICES",
    "CUDA_CHOICES",
    "Backend",
    "Settings",
    "settings",
    "status",
    "use",
]


def status() -> tuple[Backend, ...]:
    """One `Backend` per device (`cpu`, `cuda`), dtype and operation (`nearest_codes`,
    `straight_through`): the backend that runs now and, where it is not the fast one, why
    (for a failed build, with the compiler's own error text).

    Builds or loads the CPU kernels if that has not happened yet.
    """
    return _describe()
