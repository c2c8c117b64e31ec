"""The compiled CPU kernels: built on first use, loaded with ctypes, optional.

`csrc/nearest.c` (the search), `csrc/straight_through.c` (the straight-through output and
commitment loss, forward and backward), `csrc/fused_forward.c` (quantize's one pass after
the search: validity, outputs, loss and histogram) and `csrc/cluster_sums.c` (the centroid
update of k-means), with their shared header `csrc/vqfunc_kernels.h`
(status codes, the CPU check, helpers), are plain C files (no torch headers, no Python API),
so they build in about a second with the system C compiler and need neither ninja nor torch
headers. The shared library is cached under `$VQFUNC_CACHE_DIR` (default `~/.cache/vqfunc`, or
a private temporary directory when there is no home), keyed by a hash of the sources, the
compiler and its `--version`, the flags and the target ISA. The cache is trusted only when it
belongs to this user and is not writable by others; a library is built under a file lock,
flushed and renamed into place, and loaded only when its size and sha256 match those recorded
beside it (a truncated one is rebuilt, not mapped). Any failure (no compiler, an untrusted
cache) makes `available()` false, `failure()` says why (with the
compiler's own error text), and `vqfunc._kernels.policy` decides whether torch takes over
(with a warning) or the failure is an error.

One library carries every ISA path of the kernels (`ISA_PATHS`: portable C with GCC vector
extensions, AVX2 + FMA, AVX-512, and AVX-512 with the search's scores on the AMX tiles),
each call names the path it runs; `isa_paths()` says which
this CPU runs (read from its features at run time), so the same library serves any x86-64 CPU
and, with the portable path alone, any other architecture.

The kernels run on OpenMP threads. Built with `-fopenmp`, the library needs `libgomp.so.1`,
which the dynamic loader finds already loaded when torch uses the GNU runtime (the Linux
wheels do): kernels and torch's own operators then share one thread pool, and neither leaves
the other's threads spinning on the cores it needs. Each call is synchronous, so every tensor
whose memory C reads or writes is alive for its whole duration.

Memory safety rests on the wrappers: they check shapes, dtype and device before any pointer
reaches C.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from vqfunc._kernels import build as _build_spec

_CSRC = _build_spec.CSRC
_SOURCES = _build_spec.SOURCES
_HEADERS = _build_spec.HEADERS
_PACKAGED = _CSRC.parent / _build_spec.PREBUILT_DIR / _build_spec.PREBUILT_NAME
# The status codes of csrc/vqfunc_kernels.h.
_STATUS = {
    -1: "unsupported CPU or sizes",
    -2: "out of memory",
    -3: "a code outside the codebook",
    -4: "inconsistent thread or buffer counts",
}
_FLAGS = _build_spec.FLAGS
_OPENMP_FLAGS = _build_spec.OPENMP_FLAGS
# The ISA paths of the kernels, by their number in csrc/vqfunc_kernels.h (VQ_ISA_*).
ISA_PATHS = ("portable", "avx2", "avx512", "amx")
# Codes per panel, as in the C source (the codebook is padded to whole groups of panels, whose
# size depends on d: `vq_padded_codes`).
PANEL = 16
# Below this many score evaluations per thread a second thread costs more than it saves.
_MIN_WORK_PER_THREAD = 1 << 23
# Slices of work per thread (see search_plan), and the rows of a slice a multiple of this: 16
# rows are whole cache lines of the float32 distances and the int64 codes, so threads writing
# neighbouring slices share no line.
_SLICES_PER_THREAD = 8
_SLICE_ALIGN = 16
# Rows of a slice at least (unless that leaves a thread without one): each slice sweeps the
# whole codebook, so a small batch split into 16-row slices reads a large codebook from L2 or
# L3 once per 16 rows. At N = 256, d = 64, K = 8192 on two threads 128-row slices searched in
# 0.81-0.85 ms where 16-row slices took 0.97-0.99 ms (2-core Intel Xeon, AVX-512).
_MIN_SLICE_ROWS = 128
# Codebook entries (1 MiB) per thread of the centring and the packing: a codebook [16384, 256]
# took 1.4 + 1.7 ms on one core, 0.7 + 0.9 ms on two, about what 256 rows take to search.
_MIN_CODEBOOK_FLOATS = 1 << 18


# A temporary build directory older than this was left by a killed build: removed.
_STALE_SECONDS = 600


@functools.lru_cache(maxsize=1)
def _private_temporary_dir() -> Path:
    # No usable home: a directory of this process only (mkdtemp makes it 0700).
    return Path(tempfile.mkdtemp(prefix="vqfunc-kernels-"))


def _cache_dir() -> Path:
    root = os.environ.get("VQFUNC_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "vqfunc"
    try:
        home = Path.home()
    except (RuntimeError, KeyError, OSError):  # no HOME and no passwd entry
        return _private_temporary_dir()
    return home / ".cache" / "vqfunc"


def _unsafe(path: Path, what: str) -> str | None:
    """Why `path` must not be trusted (not ours, or writable by others), or None."""
    info = path.stat()
    if info.st_uid != os.geteuid():
        return f"{what} {path} is owned by uid {info.st_uid}, not by this user"
    if info.st_mode & 0o022:
        return f"{what} {path} is group- or world-writable (mode {info.st_mode & 0o777:o})"
    return None


def _prepare_cache_dir(path: Path) -> Path:
    """The cache directory, created private if missing; raises when it cannot be trusted."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    problem = _unsafe(path, "cache directory")
    if problem is not None:
        raise _BuildError(f"refused the {problem}")
    return path


def _compiler() -> str | None:
    return _build_spec.find_compiler(os.environ.get("CC"))


@functools.lru_cache(maxsize=8)
def _compiler_version(compiler: str) -> str:
    try:
        done = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError) as error:
        return f"unknown ({error})"
    return done.stdout + done.stderr


def _target_isa() -> str:
    """The machine and the vector extensions the kernels care about, as the cache key sees them."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f")
    return platform.machine() + "".join(f"+{name}" for name in wanted if name in flags)


class _BuildError(RuntimeError):
    """A build or load that failed; the message carries the compiler's own error text."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _record_path(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _verify(target: Path) -> str | None:
    """Why the cached library at `target` must not be loaded, or None when it may.

    Its size and sha256 are recorded beside it when it is built: a truncated or altered file
    (which ctypes would map and crash on) fails here instead.
    """
    record = _record_path(target)
    if not target.exists() or not record.exists():
        return "not built"
    for path, what in ((target, "cached library"), (record, "cached library record")):
        problem = _unsafe(path, what)
        if problem is not None:
            return problem
    try:
        size_text, digest = record.read_text().split()
        size = int(size_text)
    except ValueError:
        return f"the record {record} is malformed"
    if target.stat().st_size != size:
        return f"the cached library {target} has {target.stat().st_size} bytes, not {size}"
    if _sha256(target) != digest:
        return f"the cached library {target} does not match its recorded sha256"
    return None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive `fcntl` lock on `path`, held for the block (one build per key at a time)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove_stale_temporaries(cache: Path) -> None:
    """Remove the temporary build directories of killed builds (older than `_STALE_SECONDS`)."""
    now = time.time()
    for entry in cache.glob("tmp*"):
        try:
            if entry.is_dir() and now - entry.stat().st_mtime > _STALE_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cache_key(
    compiler: str, version: str, isa: str, flags: tuple[str, ...], files: dict[str, bytes]
) -> str:
    """The name of a cached library: a hash of the sources, the compiler, its `--version`
    text, the target ISA and the flags."""
    return hashlib.sha256(
        b"\0".join(name.encode() + b"\0" + text for name, text in files.items())
        + b"\0"
        + "\0".join((compiler, version, " ".join(flags))).encode()
        + isa.encode()
    ).hexdigest()[:16]


def _build(compiler: str, flags: tuple[str, ...], *, rebuild: bool = False) -> Path:
    """The cached library for these flags, verified, built first when missing or bad.

    Built under a file lock beside the target, flushed to disk and renamed into place, its size
    and sha256 recorded beside it. `rebuild` discards a cached library that verified but did
    not load.
    """
    files = _build_spec.source_files()
    cache = _prepare_cache_dir(_cache_dir())
    key = cache_key(compiler, _compiler_version(compiler), _target_isa(), flags, files)
    target = cache / f"cpu_kernels_{key}.so"
    with _file_lock(target.with_name(target.name + ".lock")):
        _remove_stale_temporaries(cache)
        problem = _verify(target)
        if problem is None and not rebuild:
            return target
        if problem is not None and problem != "not built":
            warnings.warn(f"vqfunc: {problem}; rebuilding it", RuntimeWarning, stacklevel=4)
        for path in (target, _record_path(target)):
            path.unlink(missing_ok=True)
        # Compile the very bytes that were hashed (not the files, which may have changed
        # since), so a cached library always matches its key.
        with tempfile.TemporaryDirectory(dir=cache) as work:
            for name, text in files.items():
                Path(work, name).write_bytes(text)
            tmp = Path(work, target.name)
            command = _build_spec.compile_command(compiler, flags, Path(work), tmp)
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.SubprocessError) as error:
                raise _BuildError(f"{' '.join(command[:-2])} failed: {error}") from error
            if done.returncode != 0:
                raise _BuildError(
                    f"{compiler} {' '.join(flags)} exited with status {done.returncode}: "
                    + (done.stderr.strip() or done.stdout.strip() or "no output")
                )
            data = tmp.read_bytes()
            _write_synced(tmp, data)  # flushed before the rename makes it visible
            os.chmod(tmp, 0o755)
            record = Path(work, "record")
            _write_synced(record, f"{len(data)} {hashlib.sha256(data).hexdigest()}\n".encode())
            os.chmod(record, 0o644)
            os.replace(tmp, target)
            os.replace(record, _record_path(target))
            _fsync_dir(cache)
        problem = _verify(target)
        if problem is not None:
            raise _BuildError(f"the library just built does not verify: {problem}")
    return target


def _declare(lib: ctypes.CDLL) -> None:
    ptr, i64, f32, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.vq_supported.restype = c_int
    lib.vq_isa_available.restype = c_int
    lib.vq_isa_available.argtypes = [c_int]
    lib.vq_fma_probe.restype = c_int
    lib.vq_fma_probe.argtypes = [c_int, i64, c_int, ptr, ptr]  # isa, rounds, threads, out
    lib.vq_center_f32.restype = c_int
    lib.vq_center_f32.argtypes = [ptr, i64, i64, ptr, c_int]  # codebook, K, d, center, threads
    lib.vq_padded_codes.restype = i64
    lib.vq_padded_codes.argtypes = [i64, i64]  # K, d
    lib.vq_pack_f32.restype = None
    lib.vq_pack_f32.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, c_int]  # ..., norms, threads
    lib.vq_nearest_f32.restype = c_int
    lib.vq_nearest_f32.argtypes = [
        *(ptr, i64, i64, i64),  # x, n, d, row stride
        *(ptr, ptr, i64, i64, ptr),  # panels, norms, panel count, K, book
        *(ptr, ptr, ptr),  # center, codes, distances
        *(i64, c_int, c_int),  # rows per slice, threads, ISA path
    ]
    lib.vq_amx_codes_f32.restype = c_int
    lib.vq_amx_codes_f32.argtypes = [
        *(ptr, i64, i64, ptr, ptr, i64, i64),  # x, n, d, panels, norms, panel count, K
        *(ptr, ptr),  # center, codes
    ]
    lib.vq_quantize_f32.restype = c_int
    lib.vq_quantize_f32.argtypes = [
        *(ptr, i64, i64, ptr, ptr, i64, i64, ptr),  # x, n, d, panels, norms, panel count, K, book
        *(ptr, ptr, ptr, ptr),  # center, mask, codes, distances
        *(ptr, ptr, ptr, ptr),  # z, out, z_q, valid
        *(ptr, ptr, ptr, ptr, c_int),  # histogram, loss, invalid count, perplexity, streaming
        *(i64, c_int, c_int),  # rows per slice, threads, ISA path
    ]
    lib.vq_cluster_sums_f32.restype = c_int
    lib.vq_cluster_sums_f32.argtypes = [
        *(ptr, i64, i64, ptr, i64),  # x, n, d, codes, k
        *(ptr, ptr, c_int),  # sums, counts, threads
    ]
    lib.vq_st_forward_f32.restype = c_int
    lib.vq_st_forward_f32.argtypes = [
        *(ptr, ptr, ptr, ptr, i64, i64, i64),  # z, codebook, codes, weights, num_codes, d, n
        *(ptr, ptr, ptr, i64, c_int),  # out, z_q, partial sums, slices, threads
        c_int,  # ISA path
    ]
    lib.vq_st_backward_f32.restype = c_int
    lib.vq_st_backward_f32.argtypes = [
        *(ptr, ptr, ptr, ptr, i64, i64, i64),  # z, codebook, codes, weights, num_codes, d, n
        *(ptr, i64, i64, ptr, i64, i64),  # g and gq with their row and column strides
        *(f32, f32, f32),  # a_z, a_q, nu
        *(ptr, ptr, ptr, i64, c_int),  # grad_z, grad_cb, extra buffers, books, threads
        c_int,  # ISA path
    ]
    lib.vq_fused_forward_f32.restype = c_int
    lib.vq_fused_forward_f32.argtypes = [
        *(ptr, i64, i64, i64),  # rows, m, groups, d
        *(ptr, i64, i64, ptr),  # codebook, books, codes per book, mask
        *(ptr, ptr, ptr, ptr, ptr, ptr),  # codes, distances, z, out, z_q, valid
        *(ptr, ptr, ptr, c_int, c_int),  # histogram, loss, invalid count, streaming, threads
        c_int,  # ISA path
    ]


def _load_built(compiler: str, flags: tuple[str, ...]) -> tuple[ctypes.CDLL, Path]:
    """Build (or reuse) and load; a verified library that does not load is rebuilt once."""
    path = _build(compiler, flags)
    try:
        return ctypes.CDLL(str(path)), path
    except OSError:
        path = _build(compiler, flags, rebuild=True)
        try:
            return ctypes.CDLL(str(path)), path
        except OSError as error:
            raise _BuildError(f"{path} does not load: {error}") from error


def _verify_prebuilt(path: Path) -> str | None:
    """Why the library built with the package must not be loaded, or None when it may."""
    record = path.with_name(path.name + ".sha256")
    if not record.exists():
        return f"{path} has no record"
    if path.stat().st_mode & 0o002 or record.stat().st_mode & 0o002:
        return f"{path} or its record is world-writable"
    try:
        size_text, digest, sources, _ = record.read_text().split()
        size = int(size_text)
    except ValueError:
        return f"the record {record} is malformed"
    if sources != _build_spec.source_digest(_build_spec.source_files()):
        return f"{path} was built from other sources"
    if path.stat().st_size != size or _sha256(path) != digest:
        return f"{path} does not match its record"
    return None


def prebuilt_path() -> Path | None:
    """The prebuilt library to try before the cache, from `VQFUNC_PREBUILT` (read at each
    load): unset or `1`, the one built with the package; `0`, none (always build on first use,
    into the cache); anything else, the path of a library built by `vqfunc._kernels.build`
    elsewhere (with its `.sha256` record beside it)."""
    choice = os.environ.get("VQFUNC_PREBUILT", "1").strip()
    if choice in ("", "1"):
        return _PACKAGED
    if choice == "0":
        return None
    return Path(choice)


def _load_prebuilt() -> tuple[ctypes.CDLL | None, str]:
    path = prebuilt_path()
    if path is None:
        return None, "the library built with the package is ignored (VQFUNC_PREBUILT=0)"
    if not path.exists():
        return None, f"no library was built with the package ({path})"
    problem = _verify_prebuilt(path)
    if problem is not None:
        return None, problem
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as error:
        return None, f"{path} does not load: {error}"
    _declare(lib)
    serial = "serial" in path.with_name(path.name + ".sha256").read_text()
    threads = "single-threaded" if serial else "OpenMP"
    return lib, f"built with the package, {path} ({threads})"


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    """The loaded library and where it came from, or None and why not.

    The library built with the package when it matches the sources, else one built on first
    use into the cache.
    """
    lib, prebuilt_note = _load_prebuilt()
    if lib is not None:
        return lib, prebuilt_note
    compiler = _compiler()
    if compiler is None:
        return None, f"{prebuilt_note}, and no C compiler found ($CC, cc, gcc or clang on PATH)"
    errors = []
    for flags in (_FLAGS + _OPENMP_FLAGS, _FLAGS):
        try:
            lib, path = _load_built(compiler, flags)
        except (_BuildError, OSError) as error:
            errors.append(str(error))
            continue
        _declare(lib)
        threads = "OpenMP" if flags != _FLAGS else "single-threaded: the compiler lacks OpenMP"
        return lib, f"built on first use into {path} ({threads})"
    return None, "the build failed: " + " | then without OpenMP: ".join(errors)


def _library() -> ctypes.CDLL | None:
    return _load()[0]


def isa_paths() -> tuple[str, ...]:
    """The ISA paths this CPU runs, slowest first (`"portable"` always); requires `available()`."""
    lib = _load()[0]
    if lib is None:
        raise RuntimeError("the vqfunc CPU kernel is not available on this machine")
    return _paths_of(lib)


@functools.lru_cache(maxsize=4)
def _paths_of(lib: ctypes.CDLL) -> tuple[str, ...]:
    """`isa_paths` of one loaded library, asked once (the CPU does not change)."""
    return tuple(name for code, name in enumerate(ISA_PATHS) if lib.vq_isa_available(code))


def best_isa() -> str:
    """The fastest ISA path this CPU runs; requires `available()`."""
    return isa_paths()[-1]


def isa_number(isa: str | None) -> int:
    """The number (`VQ_ISA_*`) of path `isa` (None: the best one); raises when this CPU lacks
    it, or `isa` is not one of `ISA_PATHS`."""
    if isa is None:
        isa = best_isa()
    if isa not in ISA_PATHS:
        raise ValueError(f"isa: expected one of {ISA_PATHS}, got {isa!r}")
    if isa not in isa_paths():
        raise RuntimeError(
            f"the {isa} kernel path does not run on this CPU ({platform.machine()}, which runs "
            f"{', '.join(isa_paths())})"
        )
    return ISA_PATHS.index(isa)


def fma_probe(isa: str | None = None, threads: int = 1, rounds: int = 1 << 22) -> float:
    """The rate, in flop/s, of `rounds` rounds of independent multiply-adds (FMAs where the
    path has them) on the vectors of path `isa` (None: the best one), on `threads` threads at
    once: the arithmetic limit of that path on these cores. One timed run; repeat and take
    the best for a stable figure."""
    lib = library()
    code = isa_number(isa)
    flops, seconds = ctypes.c_double(), ctypes.c_double()
    status = lib.vq_fma_probe(code, rounds, threads, ctypes.byref(flops), ctypes.byref(seconds))
    check_status(status)
    return flops.value / max(seconds.value, 1e-9)


def failure() -> str:
    """Why the kernels are not available (the compiler's error text included), or ""."""
    lib, note = _load()
    return "" if lib is not None else note


def location() -> str:
    """Where the loaded library came from, or why there is none."""
    return _load()[1]


def reset() -> None:
    """Forget the loaded library, so that the next use builds or loads it again."""
    _load.cache_clear()


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


def _codebook_threads(book: Tensor) -> int:
    """Threads for one pass over a codebook: one per `_MIN_CODEBOOK_FLOATS` entries, at most
    `max_threads()`."""
    return max(1, min(max_threads(), book.numel() // _MIN_CODEBOOK_FLOATS))


def pack_codebook(codebook: Tensor, center: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`[K, d]` float32 (less `center` `[d]`, when given) -> (panels `[P, d, 16]`, half squared
    norms `[P * 16]`), padded to whole groups of the search (a multiple of 64 codes, of 128 for
    16 < d < 64 and for d <= 16 from K = 4096 on: `vq_padded_codes` in the C source).

    Padding codes and codes with a non-finite entry have half norm `+inf` (and zero entries) so
    that they never win. Requires `available()`.
    """
    lib = library()
    _check_matrix("codebook", codebook)
    book = codebook.resolve_neg().contiguous()
    k, d = book.shape
    if center is not None and (center.shape != (d,) or center.dtype != torch.float32):
        raise ValueError(f"center: expected a float32 tensor of shape ({d},), got {center.shape}")
    padded_k = int(lib.vq_padded_codes(k, d))
    panels = torch.empty(padded_k // PANEL, d, PANEL, dtype=torch.float32)
    half_norms = torch.empty(padded_k, dtype=torch.float32)
    center_ptr = None if center is None else center.resolve_neg().contiguous().data_ptr()
    lib.vq_pack_f32(
        *(book.data_ptr(), k, d, padded_k, center_ptr, panels.data_ptr(), half_norms.data_ptr()),
        _codebook_threads(book),
    )
    return panels, half_norms


def codebook_center_f32(codebook: Tensor) -> Tensor:
    """The mean `[d]` of the finite codes of a float32 CPU codebook `[K, d]` (zeros when none
    is finite), accumulated in float64: what `torch_search.codebook_center` computes, in one
    pass. Requires `available()`."""
    _check_matrix("codebook", codebook)
    book = codebook.resolve_neg().contiguous()
    center = torch.empty(book.shape[1], dtype=torch.float32)
    threads = _codebook_threads(book)
    check_status(library().vq_center_f32(book.data_ptr(), *book.shape, center.data_ptr(), threads))
    return center


def _check_search_inputs(vectors: Tensor, codebook: Tensor) -> None:
    """`vectors [N, d]` and `codebook [K, d]`: float32 CPU matrices of the same d (the kernels
    read d floats per row of both: a mismatch would read past the codebook)."""
    _check_matrix("vectors", vectors)
    _check_matrix("codebook", codebook)
    if vectors.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"codebook: expected {vectors.shape[1]} columns (the dimension of vectors), "
            f"got shape {tuple(codebook.shape)}"
        )


def _rows_in_place(vectors: Tensor) -> Tensor:
    """`vectors [N, d]` as the search reads them: in place when each row's d floats are
    contiguous (a column slice of a wider matrix, rows at any stride), else a contiguous copy.
    The search only reads its rows, so a slice of every group's features needs no copy (about
    15 % of four searches of 65536 x 32 slices against 128 codes)."""
    if vectors.shape[1] <= 1 or vectors.stride(1) == 1:
        return vectors
    return vectors.contiguous()


@torch.profiler.record_function("vqfunc.cpu_kernel.nearest_codes")
def nearest_codes_f32(
    vectors: Tensor, codebook: Tensor, isa: str | None = None
) -> tuple[Tensor, Tensor]:
    """Codes `[N]` int64 of the nearest rows of `codebook` `[K, d]` for `vectors` `[N, d]`,
    and the Euclidean distances `[N]` float32 to them.

    Both float32 on CPU; requires `available()`. Uses up to `max_threads()` threads, and the
    ISA path `isa` (one of `ISA_PATHS`; None: the best one this CPU runs).
    """
    lib = library()
    isa_code = isa_number(isa)
    _check_search_inputs(vectors, codebook)
    x = _rows_in_place(vectors.resolve_neg())
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
    plan = search_plan(n, book)
    status = lib.vq_nearest_f32(
        *(x.data_ptr(), n, d, x.stride(0), plan.panels.data_ptr(), plan.half_norms.data_ptr()),
        *(plan.num_panels, k, book.data_ptr(), plan.center.data_ptr()),
        *(codes.data_ptr(), distances.data_ptr(), plan.rows_per_slice, plan.threads, isa_code),
    )
    check_status(status)
    return codes, distances


def amx_codes_f32(vectors: Tensor, codebook: Tensor) -> Tensor:
    """What the `amx` path's tiles alone answer for `vectors` `[N, d]` against `codebook`
    `[K, d]` (contiguous float32 on CPU): codes `[N]` int64, the first code of each row's
    least score as the `avx512` path computes it, or -1 for a row the tiles leave to that
    path (non-finite entries, magnitudes past 2^100, too many near-ties). For the tests of the
    path: a search takes the tiles only for d >= 32 and N >= 256, and the rows left open are
    searched as on `avx512`. Raises `RuntimeError` where the path does not run (or d < 32)."""
    lib = library()
    _check_search_inputs(vectors, codebook)
    if codebook.shape[0] == 0:
        raise ValueError(f"codebook: expected at least one code, got shape {tuple(codebook.shape)}")
    x, book = vectors.contiguous(), codebook.contiguous()
    plan = search_plan(max(1, x.shape[0]), book)
    codes = torch.empty(x.shape[0], dtype=torch.int64)
    status = lib.vq_amx_codes_f32(
        *(x.data_ptr(), *x.shape, plan.panels.data_ptr(), plan.half_norms.data_ptr()),
        *(plan.num_panels, book.shape[0], plan.center.data_ptr(), codes.data_ptr()),
    )
    check_status(status)
    return codes


class SearchPlan(NamedTuple):
    """What a search of `n` rows against a contiguous float32 codebook `[K, d]` hands the
    kernel: the codebook centred on its mean and packed, and the split of the rows."""

    center: Tensor  # [d] the mean of the finite codes
    panels: Tensor  # [P, d, 16] the centred codes, packed
    half_norms: Tensor  # [P * 16]
    num_panels: int  # panels of PANEL codes in the padded codebook
    threads: int
    rows_per_slice: int  # the slices are handed out dynamically


def search_plan(n: int, book: Tensor) -> SearchPlan:
    """The `SearchPlan` of `n >= 1` rows against `book` `[K, d]` (contiguous float32, d >= 1)."""
    d = book.shape[1]
    # Rows and codes are scored centred on the codes' mean (the kernel centres each row block).
    center = codebook_center_f32(book)
    panels, half_norms = pack_codebook(book, center)
    work = n * half_norms.shape[0] * d
    threads = max(1, min(max_threads(), work // _MIN_WORK_PER_THREAD))
    # Several slices per thread, handed out dynamically, so that a thread the OS delays (a busy
    # machine) leaves its share to the others instead of being waited for; and of equal size,
    # so that on a quiet machine every thread gets the same work (slices of whole 240-row
    # blocks left the last one short: 15.2 slices' work in 16 at N = 65536 on two threads, one
    # thread doing 8 of them, ~5 % of the search lost); and of _MIN_SLICE_ROWS rows at least
    # where the batch gives every thread that many.
    slices = max(threads, min(_SLICES_PER_THREAD * threads, n // _MIN_SLICE_ROWS))
    rows_per_slice = _SLICE_ALIGN * max(1, -(-n // (_SLICE_ALIGN * slices)))
    num_panels = half_norms.shape[0] // PANEL
    return SearchPlan(center, panels, half_norms, num_panels, threads, rows_per_slice)


def check_status(status: int) -> None:
    """Raise for a kernel's non-zero status code (see `csrc/vqfunc_kernels.h`)."""
    if status != 0:
        reason = _STATUS.get(status, "unknown status")
        raise RuntimeError(f"vqfunc CPU kernel failed with status {status} ({reason})")
