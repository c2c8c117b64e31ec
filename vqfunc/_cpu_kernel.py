"""The compiled CPU search kernel: built on first use, loaded with ctypes, optional.

`_nearest_kernel.c` is a plain C file (no torch headers, no Python API), so it builds in about a
second with the system C compiler and needs neither ninja nor a build step at install time.
The shared library is cached under `$VQFUNC_CACHE_DIR` (default `~/.cache/vqfunc`), keyed by a
hash of the source, compiler and flags. Any failure (no compiler, not x86-64 with AVX2 and FMA,
a read-only cache) makes `available()` false, and the search uses its pure-torch path.
Set `VQFUNC_CPU_KERNEL=0` to disable the kernel.

Memory safety rests on this wrapper: it checks shapes, dtype and device before any pointer
reaches C, keeps every tensor whose pointer a search thread uses alive until that thread is
done (even when the caller leaves early on an exception or KeyboardInterrupt), and drops its
thread pool in a forked child (the parent's threads do not exist there).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import itertools
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

_SOURCE = Path(__file__).with_name("_nearest_kernel.c")
_FLAGS = ("-O3", "-fPIC", "-shared", "-fno-strict-aliasing")
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


def _build(compiler: str) -> Path:
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(
        source + compiler.encode() + " ".join(_FLAGS).encode() + platform.machine().encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"nearest_kernel_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target, then rename: concurrent processes never see a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    # Compile the very bytes that were hashed (not the file, which may have changed since), so
    # a cached library always matches its key.
    fd, tmp_source = tempfile.mkstemp(suffix=".c", dir=target.parent)
    with os.fdopen(fd, "wb") as file:
        file.write(source)
    try:
        subprocess.run(
            [compiler, *_FLAGS, "-o", tmp, tmp_source],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(tmp, target)
    finally:
        for path in (tmp, tmp_source):
            if os.path.exists(path):
                os.unlink(path)
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
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError):
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
    lib.vq_nearest_f32.restype = ctypes.c_int
    lib.vq_nearest_f32.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
    ]
    return lib


def available() -> bool:
    """Whether the compiled kernel can run on this machine (builds it on first call)."""
    return _library() is not None


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _thread_pool() -> ThreadPoolExecutor:
    # ctypes releases the GIL during the call, so plain Python threads run the row ranges
    # in parallel; the pool is created once and reused.
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
        return _pool


def _forget_pool_in_child() -> None:
    # A forked child inherits the pool object but none of its threads: work submitted to it
    # would never run. The child starts its own pool (and lock) on first use.
    global _pool, _pool_lock
    _pool = None
    _pool_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_in_child)


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

    Padding codes have half norm `+inf` so that they never win. Requires `available()`.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("the vqfunc CPU kernel is not available on this machine")
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

    Both float32 on CPU; requires `available()`. Uses `torch.get_num_threads()` threads.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("the vqfunc CPU kernel is not available on this machine")
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
    # Empty, not zeros: the kernel writes every entry, and a parallel fill would leave torch's
    # OpenMP workers spinning on the cores the kernel's threads need.
    codes = torch.empty(n, dtype=torch.int64)
    distances = torch.empty(n, dtype=torch.float32)
    if n == 0:
        return codes, distances
    panels, half_norms = pack_codebook(book)
    groups = half_norms.shape[0] // GROUP
    args = (
        x.data_ptr(),
        d,
        panels.data_ptr(),
        half_norms.data_ptr(),
        groups,
        k,
        book.data_ptr(),
        codes.data_ptr(),
        distances.data_ptr(),
    )

    def run(begin: int, end: int) -> None:
        status = lib.vq_nearest_f32(args[0], begin, end, *args[1:])
        if status != 0:
            raise RuntimeError(f"vqfunc CPU kernel failed with status {status}")

    work = n * groups * GROUP * max(d, 1)
    threads = max(1, min(torch.get_num_threads(), work // _MIN_WORK_PER_THREAD))
    if threads == 1:
        run(0, n)
        return codes, distances
    # Work is handed out in slices of whole row blocks from a shared counter, so a thread
    # that the OS delays (a busy machine) leaves its share to the others instead of being
    # waited for. The calling thread is one of the workers.
    rows_per_slice = _ROW_BLOCK * max(1, -(-n // (_ROW_BLOCK * _SLICES_PER_THREAD * threads)))
    starts = range(0, n, rows_per_slice)
    counter = itertools.count()
    failed = threading.Event()
    # Every tensor whose pointer is in `args`, held by each worker (a default argument lives
    # as long as the function object, which the pool keeps until the worker has run): the
    # memory outlives the call if the caller leaves early.
    buffers = (x, book, panels, half_norms, codes, distances)

    def worker(held: tuple[Tensor, ...] = buffers) -> None:
        try:
            while not failed.is_set() and (i := next(counter)) < len(starts):
                run(starts[i], min(starts[i] + rows_per_slice, n))
        except BaseException:
            failed.set()
            raise

    futures = [_thread_pool().submit(worker) for _ in range(threads - 1)]
    try:
        worker()
    finally:
        # Also on an error or interrupt here: the others stop after their current slice.
        concurrent.futures.wait(futures)
    for future in futures:
        future.result()
    return codes, distances
