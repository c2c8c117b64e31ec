"""How the CPU kernels are compiled: shared by the package build (`setup.py`, which loads this
file by path, without importing vqfunc or torch) and by the first-use build of `cpu.py`.

Plain C (`csrc/`), the system C compiler, no torch headers. The package build puts the library
and a record of it in `prebuilt/`; `cpu.py` loads it from there when the record matches the
sources, and otherwise builds into its cache.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")
# The search kernel, the straight-through kernels, the fused pass after the search and the
# k-means cluster sums, built together into one library.
SOURCES = ("nearest.c", "straight_through.c", "fused_forward.c", "cluster_sums.c")
HEADERS = ("vqfunc_kernels.h", "nearest_path.h", "nearest_amx.h")
FLAGS = ("-O3", "-fPIC", "-shared", "-fno-strict-aliasing")
# OpenMP threads, in the runtime torch loads (libgomp.so.1 on Linux builds, found by its
# soname); a compiler without OpenMP builds the same kernels single-threaded.
OPENMP_FLAGS = ("-fopenmp",)
PREBUILT_DIR = "prebuilt"
PREBUILT_NAME = "cpu_kernels.so"


def source_files(csrc: Path = CSRC) -> dict[str, bytes]:
    """The bytes of every source and header, by name."""
    return {name: (csrc / name).read_bytes() for name in (*SOURCES, *HEADERS)}


def source_digest(files: dict[str, bytes]) -> str:
    """A hash of the sources and headers (what a prebuilt library was compiled from)."""
    return hashlib.sha256(
        b"\0".join(name.encode() + b"\0" + text for name, text in files.items())
    ).hexdigest()


def find_compiler(preferred: str | None) -> str | None:
    """`preferred` (usually $CC), else cc, gcc or clang, as found on PATH."""
    for name in (preferred, "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def compile_command(compiler: str, flags: tuple[str, ...], work: Path, out: Path) -> list[str]:
    """The compiler command line that builds `out` from the sources copied into `work`."""
    return [compiler, *flags, "-o", str(out), *(str(work / name) for name in SOURCES)]


def record_text(data: bytes, sources: str, openmp: bool) -> str:
    """The record written beside a library: size, sha256, sources digest, threading."""
    digest = hashlib.sha256(data).hexdigest()
    return f"{len(data)} {digest} {sources} {'openmp' if openmp else 'serial'}\n"


def build_prebuilt(target_dir: Path, compiler: str | None) -> str:
    """Compile the library into `target_dir` (with its record); returns what happened."""
    compiler = find_compiler(compiler)
    if compiler is None:
        return "no C compiler found; the kernels will be built on first use"
    files = source_files()
    target_dir.mkdir(parents=True, exist_ok=True)
    out = target_dir / PREBUILT_NAME
    work = target_dir / "tmp-build"
    work.mkdir(exist_ok=True)
    errors = []
    try:
        for name, text in files.items():
            (work / name).write_bytes(text)
        for flags, openmp in ((FLAGS + OPENMP_FLAGS, True), (FLAGS, False)):
            tmp = work / PREBUILT_NAME
            command = compile_command(compiler, flags, work, tmp)
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                errors.append(done.stderr.strip())
                continue
            data = tmp.read_bytes()
            tmp.replace(out)
            record = target_dir / (PREBUILT_NAME + ".sha256")
            record.write_text(record_text(data, source_digest(files), openmp))
            return f"built {out} with {compiler} ({'OpenMP' if openmp else 'single-threaded'})"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return "the kernels did not compile (they will be built on first use): " + " | ".join(errors)
