"""Which backend runs: the one place that decides, read from the environment once.

Three settings, process-wide (not per thread, so autograd's worker threads see the same):

- `cpu`: `"compiled"` (the default: the C kernels of `csrc/` for float32 CPU tensors when they
  build and load, else torch with a warning, once), `"torch"` (never the C kernels) or
  `"require"` (the C kernels or an error: a fallback raises instead of warning).
  `VQFUNC_CPU_KERNEL=1|0|require` sets the initial value.
- `cpu_isa`: which ISA path the C kernels take: `"auto"` (the default: the fastest this CPU
  runs), `"amx"` (the search's scores on the AMX tiles, exact), `"avx512"`, `"avx2"` or
  `"portable"` (plain C with vector extensions, any CPU); a path the CPU lacks is an error when
  a kernel runs. `VQFUNC_CPU_ISA` sets the initial value.
- `cuda`: `"torch"` (the default) or `"triton"` (the fused Triton search, when Triton imports;
  else torch with a warning, once). `VQFUNC_TRITON=1|0` sets the initial value. torch stays the
  default until a GPU benchmark has shown the Triton kernel ahead of it.

`use(cpu=..., cuda=...)` changes them for the duration of a `with` block (users and tests
alike); `describe()` reports, per device, dtype and operation, which backend runs and why the
fast one does not.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from vqfunc._kernels import cpu as _cpu_kernel
from vqfunc._kernels import triton_search as _triton_search

CPU_CHOICES = ("compiled", "torch", "require")
CUDA_CHOICES = ("torch", "triton")
CPU_ISA_CHOICES = ("auto", *_cpu_kernel.ISA_PATHS[::-1])
_CPU_ENVIRONMENT = {"1": "compiled", "0": "torch", "require": "require"}
_CUDA_ENVIRONMENT = {"1": "triton", "0": "torch"}
OPERATIONS = ("nearest_codes", "straight_through")


@dataclass(frozen=True)
class Settings:
    """The backend choices in force.

    Attributes:
        cpu: one of `CPU_CHOICES`.
        cuda: one of `CUDA_CHOICES`.
        cpu_isa: one of `CPU_ISA_CHOICES`: the ISA path of the compiled CPU kernels (`auto`,
            the fastest this CPU runs).
        chunk_elements: elements of `z` that the torch straight-through path (every device
            but the compiled CPU kernel) processes at once: it bounds that path's workspace to
            a few temporaries of this many elements (4 MiB each in float32 by default).
    """

    cpu: str = "compiled"
    cuda: str = "torch"
    cpu_isa: str = "auto"
    chunk_elements: int = 1 << 20


def _from_environment() -> Settings:
    cpu = os.environ.get("VQFUNC_CPU_KERNEL", "1").strip().lower()
    cuda = os.environ.get("VQFUNC_TRITON", "0").strip().lower()
    if cpu not in _CPU_ENVIRONMENT:
        warnings.warn(
            f"VQFUNC_CPU_KERNEL={cpu!r} is not one of 0, 1, require; using 1", stacklevel=2
        )
        cpu = "1"
    if cuda not in _CUDA_ENVIRONMENT:
        warnings.warn(f"VQFUNC_TRITON={cuda!r} is not one of 0, 1; using 0", stacklevel=2)
        cuda = "0"
    isa = os.environ.get("VQFUNC_CPU_ISA", "auto").strip().lower() or "auto"
    if isa not in CPU_ISA_CHOICES:
        warnings.warn(
            f"VQFUNC_CPU_ISA={isa!r} is not one of {', '.join(CPU_ISA_CHOICES)}; using auto",
            stacklevel=2,
        )
        isa = "auto"
    return Settings(cpu=_CPU_ENVIRONMENT[cpu], cuda=_CUDA_ENVIRONMENT[cuda], cpu_isa=isa)


_settings = _from_environment()
_lock = threading.Lock()
_warned: set[str] = set()


def settings() -> Settings:
    """The settings in force."""
    return _settings


@contextlib.contextmanager
def use(
    cpu: str | None = None,
    cuda: str | None = None,
    cpu_isa: str | None = None,
    chunk_elements: int | None = None,
) -> Iterator[Settings]:
    """Run the `with` block with these settings (None keeps the current one; see `Settings`).

    A `cpu_isa` path that this CPU lacks raises `RuntimeError` here, before the block runs
    (when the compiled kernels are available).
    """
    global _settings
    if cpu is not None and cpu not in CPU_CHOICES:
        raise ValueError(f"cpu: expected one of {CPU_CHOICES}, got {cpu!r}")
    if cuda is not None and cuda not in CUDA_CHOICES:
        raise ValueError(f"cuda: expected one of {CUDA_CHOICES}, got {cuda!r}")
    if cpu_isa is not None:
        if cpu_isa not in CPU_ISA_CHOICES:
            raise ValueError(f"cpu_isa: expected one of {CPU_ISA_CHOICES}, got {cpu_isa!r}")
        if cpu_isa != "auto" and _cpu_kernel.available():
            _cpu_kernel.isa_number(cpu_isa)  # raises for a path this CPU lacks
    bad_chunk = isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int)
    if chunk_elements is not None and (bad_chunk or chunk_elements < 1):
        raise ValueError(f"chunk_elements: expected an int >= 1, got {chunk_elements!r}")
    with _lock:
        previous = _settings
        _settings = Settings(
            cpu=previous.cpu if cpu is None else cpu,
            cuda=previous.cuda if cuda is None else cuda,
            cpu_isa=previous.cpu_isa if cpu_isa is None else cpu_isa,
            chunk_elements=previous.chunk_elements if chunk_elements is None else chunk_elements,
        )
        current = _settings
    try:
        yield current
    finally:
        with _lock:
            _settings = previous


def cpu_isa() -> str:
    """The ISA path the compiled CPU kernels take now (one of `cpu.ISA_PATHS`): the chosen
    one, or with `cpu_isa="auto"` the fastest this CPU runs. Requires the kernels; raises
    `RuntimeError` when the chosen path does not run on this CPU."""
    choice = _settings.cpu_isa
    if choice == "auto":
        return _cpu_kernel.best_isa()
    try:
        _cpu_kernel.isa_number(choice)
    except RuntimeError as error:
        raise RuntimeError(
            f"{error} (VQFUNC_CPU_ISA={choice} or use(cpu_isa={choice!r}))"
        ) from None
    return choice


def _fall_back(key: str, message: str, *, strict: bool) -> None:
    if strict:
        raise RuntimeError(f"{message} (VQFUNC_CPU_KERNEL=require or use(cpu='require'))")
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def cpu_kernel_runs(*tensors: torch.Tensor | None) -> bool:
    """Whether the compiled CPU kernels run on these tensors (float32 on CPU, None skipped).

    With `cpu="compiled"`, a kernel that does not build or load warns once and answers False;
    with `cpu="require"` it raises.
    """
    present = [t for t in tensors if t is not None]
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in present):
        return False
    choice = _settings.cpu
    if choice == "torch":
        return False
    if _cpu_kernel.available():
        return True
    _fall_back(
        "cpu",
        f"vqfunc's compiled CPU kernels are not available ({_cpu_kernel.failure()}); using "
        "torch instead (set VQFUNC_CPU_KERNEL=0 to choose torch and silence this warning)",
        strict=choice == "require",
    )
    return False


def triton_runs(vectors: torch.Tensor, codebook: torch.Tensor) -> bool:
    """Whether the Triton search runs on these tensors: only when asked for (`cuda="triton"`);
    if Triton does not import, warns once and answers False."""
    if _settings.cuda != "triton" or not _triton_search.applies(vectors, codebook):
        return False
    if _triton_search.available():
        return True
    _fall_back(
        "triton",
        f"vqfunc's Triton search is not available ({_triton_search.failure()}); using torch",
        strict=False,
    )
    return False


@dataclass(frozen=True)
class Backend:
    """Which implementation runs one operation for one device and dtype, and why."""

    device: str
    dtype: str
    operation: str
    backend: str
    reason: str

    def __str__(self) -> str:
        return f"{self.device} {self.dtype} {self.operation}: {self.backend} ({self.reason})"


def _cpu_entry(dtype: torch.dtype, operation: str) -> tuple[str, str]:
    # The search upcasts half inputs to float32 before it runs; the straight-through does not.
    kernel_dtypes: tuple[torch.dtype, ...] = (torch.float32,)
    if operation == "nearest_codes":
        kernel_dtypes = (torch.float32, torch.float16, torch.bfloat16)
    if dtype not in kernel_dtypes:
        return "torch", "the compiled kernel takes float32 only"
    if _settings.cpu == "torch":
        return "torch", "chosen (VQFUNC_CPU_KERNEL=0 or use(cpu='torch'))"
    if not _cpu_kernel.available():
        return "torch", f"the compiled kernels are not available: {_cpu_kernel.failure()}"
    where = _cpu_kernel.location()
    note = "in float32" if dtype != torch.float32 else "float32"
    try:
        isa = cpu_isa()
    except RuntimeError as error:
        return "compiled", f"{note}, {where}; but {error}"
    if operation == "straight_through" and isa == "avx512":
        isa = "avx512 (its AVX2 code: the straight-through is bound by memory)"
    chosen = (
        "chosen"
        if _settings.cpu_isa != "auto"
        else f"the fastest of {', '.join(_cpu_kernel.isa_paths())}"
    )
    return "compiled", f"{note}, {isa} path ({chosen}), {where}"


def _cuda_entry(dtype: torch.dtype, operation: str) -> tuple[str, str]:
    if operation != "nearest_codes":
        return "torch", "the only implementation on CUDA"
    if dtype not in _triton_search.DTYPES:
        return "torch", "the Triton kernel takes float32, float16 and bfloat16 only"
    if _settings.cuda != "triton":
        return "torch", (
            "the default on CUDA until a GPU benchmark shows the Triton kernel ahead; "
            "VQFUNC_TRITON=1 or use(cuda='triton') selects it"
        )
    if not _triton_search.available():
        return "torch", f"the Triton kernel is not available: {_triton_search.failure()}"
    if not torch.cuda.is_available():
        return "triton", "chosen, but no CUDA device is visible"
    return "triton", "chosen (VQFUNC_TRITON=1 or use(cuda='triton'))"


def describe() -> tuple[Backend, ...]:
    """One `Backend` per device (cpu, cuda), dtype and operation."""
    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    entries = []
    for device, entry in (("cpu", _cpu_entry), ("cuda", _cuda_entry)):
        for dtype in dtypes:
            for operation in OPERATIONS:
                backend, reason = entry(dtype, operation)
                name = str(dtype).removeprefix("torch.")
                entries.append(Backend(device, name, operation, backend, reason))
    return tuple(entries)


def reset() -> None:
    """Forget which fallbacks have warned, so that the next one warns again (for tests)."""
    _warned.clear()
