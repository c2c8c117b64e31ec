"""The compiled CPU kernels: built on first use, loaded with ctypes, optional.

`csrc/nearest.c` (the search) and `csrc/straight_through.c` (the straight-through output and
commitment loss, forward and backward), with their shared header `csrc/vqfunc_kernels.h`
(status codes, the CPU check, helpers), are plain C files (no torch headers, no Python API),
so they build in about a second with the system C compiler and need neither ninja nor a build
step at install time. The shared library is cached under `$VQFUNC_CACHE_DIR` (default
`~/.cache/vqfunc`), keyed by a hash of the sources, compiler and flags. Any failure (no
compiler, not x86-64 with AVX2 and FMA, a read-only cache) makes `available()` false, and
vqfunc uses its pure-torch paths. Set `VQFUNC_CPU_KERNEL=0` to disable the kernels.

The kernels run on OpenMP threads. Built with `-fopenmp`, the library needs `libgomp.so.1`,
which the dynamic loader finds already loaded when torch uses the GNU runtime (the Linux
wheels do): kernels and torch's own operators then share one thread pool, and neither leaves
the other's threads spinning on the cores it needs. Each call is synchronous, so every tensor
whose memory C reads or writes is alive for its whole duration.

Memory safety rests on the wrappers: they check shapes, dtype and device before any pointer
reaches C.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from vqfunc._kernels.torch_search import codebook_center

_CSRC = Path(__file__).with_name("csrc")
# The search kernel and the straight-through kernels, built together into one library.
_SOURCES = ("nearest.c", "straight_through.c")
_HEADERS = ("vqfunc_kernels.h",)
# The status codes of csrc/vqfunc_kernels.h.
_STATUS = {
    -1: "unsupported CPU or sizes",
    -2: "out of memory",
    -3: "a code outside the codebook",
    -4: "inconsistent thread or buffer counts",
}
_FLAGS = ("-O3", "-fPIC", "-shared", "-fno-strict-aliasing")
# OpenMP threads, in the runtime torch loads (libgomp.so.1 on Linux builds, found by its
# soname); a compiler without OpenMP builds the same kernels single-threaded.
_OPENMP_FLAGS = ("-fopenmp",)
# Codes per panel and the padding of the codebook (whole groups of panels), as in the C source.
PANEL = 16
GROUP = 64
# Below this many score evaluations per thread a second thread costs more than it saves.
_MIN_WORK_PER_THREAD = 1 << 23
# Rows of one row block of the C kernel, and slices of work per thread (see below).
_ROW_BLOCK = 240
_SLICES_PER_THREAD = 8


def _cache_dir() -> Path:
    root = os.environ.get("VQFUNC_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "vqfunc"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(compiler: str, flags: tuple[str, ...]) -> Path:
    files = {name: (_CSRC / name).read_bytes() for name in (*_SOURCES, *_HEADERS)}
    key = hashlib.sha256(
        b"\0".join(name.encode() + b"\0" + text for name, text in files.items())
        + compiler.encode()
        + " ".join(flags).encode()
        + platform.machine().encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"cpu_kernels_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target, then rename: concurrent processes never see a partial file.
    # Compile the very bytes that were hashed (not the files, which may have changed since),
    # so a cached library always matches its key.
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        for name, text in files.items():
            Path(work, name).write_bytes(text)
        tmp = Path(work, target.name)
        subprocess.run(
            [compiler, *flags, "-o", str(tmp), *(str(Path(work, n)) for n in _SOURCES)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(tmp, target)
    return target


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("VQFUNC_CPU_KERNEL", "1") == "0":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    compiler = _compiler()
    if compiler is None:
        return None
    lib = None
    for flags in (_FLAGS + _OPENMP_FLAGS, _FLAGS):
        try:
            lib = ctypes.CDLL(str(_build(compiler, flags)))
            break
        except (OSError, subprocess.SubprocessError):
            continue
    if lib is None:
        return None
    lib.vq_supported.restype = ctypes.c_int
    lib.vq_pack_f32.restype = None
    lib.vq_pack_f32.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    if not lib.vq_supported():
        return None
    ptr, i64, f32, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.vq_nearest_f32.restype = c_int
    lib.vq_nearest_f32.argtypes = [
        *(ptr, i64, i64, ptr, ptr, i64, i64, ptr),  # x, n, d, panels, half norms, groups, K, book
        *(ptr, ptr, ptr, i64, c_int),  # center, codes, distances, rows per slice, threads
    ]
    lib.vq_st_forward_f32.restype = c_int
    lib.vq_st_forward_f32.argtypes = [
        *(ptr, ptr, ptr, ptr, i64, i64, i64),  # z, codebook, codes, weights, num_codes, d, n
        *(ptr, ptr, ptr, i64, c_int),  # out, z_q, partial sums, slices, threads
    ]
    lib.vq_st_backward_f32.restype = c_int
    lib.vq_st_backward_f32.argtypes = [
        *(ptr, ptr, ptr, ptr, i64, i64, i64),  # z, codebook, codes, weights, num_codes, d, n
        *(ptr, i64, i64, ptr, i64, i64),  # g and gq with their row and column strides
        *(f32, f32, f32),  # a_z, a_q, nu
        *(ptr, ptr, ptr, i64, c_int),  # grad_z, grad_cb, extra buffers, books, threads
    ]
    return lib


def available() -> bool:
    """Whether the compiled kernel can run on this machine (builds it on first call)."""
    return _library() is not None


def library() -> ctypes.CDLL:
    """The loaded library; raises when `available()` is false."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the vqfunc CPU kernel is not available on this machine")
    return lib


_forked = False


def _note_fork() -> None:
    global _forked
    _forked = True


# GNU OpenMP cannot start threads in a child forked after the parent used its thread pool: the
# child would wait forever for workers that do not exist there (torch's own operators hang the
# same way). In a forked child the kernels therefore run on the calling thread alone.
os.register_at_fork(after_in_child=_note_fork)


def max_threads() -> int:
    """Threads the kernels may use: torch's intra-op thread count, or 1 in a forked child."""
    return 1 if _forked else max(1, torch.get_num_threads())


def _check_matrix(name: str, value: Tensor) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 2 or value.dtype != torch.float32 or value.device.type != "cpu":
        raise ValueError(
            f"{name}: expected a 2-D float32 CPU tensor, got shape {tuple(value.shape)}, "
            f"dtype {value.dtype}, device {value.device}"
        )


def pack_codebook(codebook: Tensor) -> tuple[Tensor, Tensor]:
    """`[K, d]` float32 -> (panels `[P, d, 16]`, half squared norms `[P * 16]`), padded to groups.

    Padding codes and codes with a non-finite entry have half norm `+inf` (and zero entries) so
    that they never win. Requires `available()`.
    """
    lib = library()
    _check_matrix("codebook", codebook)
    book = codebook.resolve_neg().contiguous()
    k, d = book.shape
    padded_k = -(-max(k, 1) // GROUP) * GROUP
    panels = torch.empty(padded_k // PANEL, d, PANEL, dtype=torch.float32)
    half_norms = torch.empty(padded_k, dtype=torch.float32)
    lib.vq_pack_f32(book.data_ptr(), k, d, padded_k, panels.data_ptr(), half_norms.data_ptr())
    return panels, half_norms


def nearest_codes_f32(vectors: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """Codes `[N]` int64 of the nearest rows of `codebook` `[K, d]` for `vectors` `[N, d]`,
    and the Euclidean distances `[N]` float32 to them.

    Both float32 on CPU; requires `available()`. Uses up to `max_threads()` threads.
    """
    lib = library()
    _check_matrix("vectors", vectors)
    _check_matrix("codebook", codebook)
    # The kernel reads d floats per row of both: a mismatch would read past the codebook.
    if vectors.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"codebook: expected {vectors.shape[1]} columns (the dimension of vectors), "
            f"got shape {tuple(codebook.shape)}"
        )
    x = vectors.resolve_neg().contiguous()
    book = codebook.resolve_neg().contiguous()
    n, d = x.shape
    k = book.shape[0]
    if n > 0 and k == 0:
        raise ValueError(f"codebook: expected at least one code, got shape (0, {d})")
    if d == 0:
        # Every code is at distance 0: the first one, as the pure-torch path answers.
        return torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.float32)
    # Empty, not zeros: the kernel writes every entry.
    codes = torch.empty(n, dtype=torch.int64)
    distances = torch.empty(n, dtype=torch.float32)
    if n == 0:
        return codes, distances
    # Rows and codes are scored centred on the codes' mean (the kernel centres each row block).
    center = codebook_center(book).contiguous()
    panels, half_norms = pack_codebook(book - center)
    groups = half_norms.shape[0] // GROUP
    work = n * groups * GROUP * max(d, 1)
    threads = max(1, min(max_threads(), work // _MIN_WORK_PER_THREAD))
    # Slices of whole row blocks, several per thread, handed out dynamically, so that a thread
    # the OS delays (a busy machine) leaves its share to the others instead of being waited for.
    rows_per_slice = _ROW_BLOCK * max(1, -(-n // (_ROW_BLOCK * _SLICES_PER_THREAD * threads)))
    status = lib.vq_nearest_f32(
        *(x.data_ptr(), n, d, panels.data_ptr(), half_norms.data_ptr(), groups, k),
        *(book.data_ptr(), center.data_ptr(), codes.data_ptr(), distances.data_ptr()),
        *(rows_per_slice, threads),
    )
    check_status(status)
    return codes, distances


def check_status(status: int) -> None:
    """Raise for a kernel's non-zero status code (see `csrc/vqfunc_kernels.h`)."""
    if status != 0:
        reason = _STATUS.get(status, "unknown status")
        raise RuntimeError(f"vqfunc CPU kernel failed with status {status} ({reason})")
