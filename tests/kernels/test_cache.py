"""The cache of the compiled CPU kernels cannot hurt: a truncated library is rebuilt (the process
survives), an untrusted one is refused, builds leave no temporaries, a machine without a home
still gets the kernels, and the kernels run with a small OpenMP thread stack. Each check that
could crash or needs its own environment runs in a child process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vqfunc._kernels import cpu as _cpu_kernel

needs_kernel = pytest.mark.skipif(
    not _cpu_kernel.available(), reason="the compiled CPU kernel does not build here"
)


@pytest.fixture(autouse=True)
def _no_prebuilt_library(monkeypatch: pytest.MonkeyPatch) -> None:
    # The library built with the package would be loaded before the cache is looked at.
    monkeypatch.setenv("VQFUNC_PREBUILT", "0")


# Searches with the compiled kernel (several threads when OMP allows), checks the codes against
# torch, and prints the warnings vqfunc gave.
# (`_env` sets VQFUNC_PREBUILT=0: the cache is what is checked here.) 6000 x 300 x 16 score
# evaluations are enough work for two threads.
_LOAD = "from vqfunc._kernels import cpu\n"
_SEARCH = (
    _LOAD
    + """
import warnings, torch
from vqfunc._search import torch_nearest_codes
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert cpu.available(), cpu.failure()
torch.set_num_threads(2)
v, c = torch.randn(6000, 16), torch.randn(300, 16)
codes, _ = cpu.nearest_codes_f32(v, c)
assert torch.equal(codes, torch_nearest_codes(v, c))
print("cache", cpu._cache_dir())
for w in caught:
    print("warning", w.message)
"""
)


def _child(code: str, env: dict[str, str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,  # type: ignore[arg-type]
    )


def _env(cache: Path | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VQFUNC_CACHE_DIR", "OMP_STACKSIZE")}
    if cache is not None:
        env["VQFUNC_CACHE_DIR"] = str(cache)
    return {**env, "OMP_NUM_THREADS": "2", "VQFUNC_PREBUILT": "0", **extra}


def _libraries(cache: Path) -> list[Path]:
    return sorted(cache.glob("cpu_kernels_*.so"))


@pytest.mark.slow
@needs_kernel
def test_a_truncated_library_is_rebuilt_and_the_process_survives(tmp_path: Path) -> None:
    first = _child(_SEARCH, _env(tmp_path))
    assert first.returncode == 0, first.stderr
    (library,) = _libraries(tmp_path)
    data = library.read_bytes()
    library.write_bytes(data[: len(data) // 2])  # what a full disk or a killed copy leaves
    second = _child(_SEARCH, _env(tmp_path))
    assert second.returncode == 0, second.stderr  # a bus error in ctypes.CDLL before
    assert "rebuilding" in second.stdout and "bytes, not" in second.stdout
    assert library.read_bytes() == data


@pytest.mark.slow
@needs_kernel
def test_a_group_writable_library_is_refused_and_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VQFUNC_CACHE_DIR", str(tmp_path))
    _cpu_kernel.reset()
    try:
        assert _cpu_kernel.available()
        (library,) = _libraries(tmp_path)
        library.chmod(0o666)
        _cpu_kernel.reset()
        with pytest.warns(RuntimeWarning, match="group- or world-writable.*rebuilding"):
            assert _cpu_kernel.available()
        assert library.stat().st_mode & 0o022 == 0
    finally:
        _cpu_kernel.reset()


@pytest.mark.slow
@needs_kernel
@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_library_planted_by_another_user_is_not_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VQFUNC_CACHE_DIR", str(tmp_path))
    _cpu_kernel.reset()
    try:
        assert _cpu_kernel.available()
        (library,) = _libraries(tmp_path)
        os.chown(library, 54321, 54321)
        _cpu_kernel.reset()
        with pytest.warns(RuntimeWarning, match="owned by uid 54321"):
            assert _cpu_kernel.available()
        assert library.stat().st_uid == os.geteuid()
    finally:
        _cpu_kernel.reset()


def test_an_untrusted_cache_directory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("VQFUNC_CACHE_DIR", str(shared))
    _cpu_kernel.reset()
    try:
        assert not _cpu_kernel.available()
        assert "refused the cache directory" in _cpu_kernel.failure()
        assert not list(shared.iterdir())  # nothing built or loaded there
    finally:
        _cpu_kernel.reset()


def test_failed_builds_keep_the_compiler_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiler = tmp_path / "broken-cc"
    compiler.write_text("#!/bin/sh\necho 'fatal error: no such header' >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setenv("VQFUNC_CACHE_DIR", str(tmp_path / "cache"))
    _cpu_kernel.reset()
    try:
        assert not _cpu_kernel.available()
        assert "fatal error: no such header" in _cpu_kernel.failure()
        assert not list((tmp_path / "cache").glob("tmp*"))  # the build's temporaries are gone
    finally:
        _cpu_kernel.reset()


@pytest.mark.slow
@needs_kernel
def test_temporaries_of_killed_builds_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A build killed between compiling and renaming leaves its temporary directory behind.
    stale, fresh = tmp_path / "tmpkilled", tmp_path / "tmprunning"
    for leftover in (stale, fresh):
        leftover.mkdir()
        (leftover / "cpu_kernels_partial.so").write_bytes(b"\0" * 100)
    old = time.time() - 3600
    os.utime(stale, (old, old))
    monkeypatch.setenv("VQFUNC_CACHE_DIR", str(tmp_path))
    _cpu_kernel.reset()
    try:
        assert _cpu_kernel.available()
        assert not stale.exists()
        assert fresh.exists()  # possibly a build still running in another process
    finally:
        _cpu_kernel.reset()


@pytest.mark.slow
@needs_kernel
def test_a_killed_build_leaves_no_library(tmp_path: Path) -> None:
    # A compiler that is killed mid-build (the whole process group, as a terminal would).
    compiler = tmp_path / "slow-cc"
    compiler.write_text('#!/bin/sh\nsleep 60\nexec cc "$@"\n')
    compiler.chmod(0o755)
    cache = tmp_path / "cache"
    child = subprocess.Popen(
        [sys.executable, "-c", _LOAD + "cpu.available()"],
        env=_env(cache, CC=str(compiler)),
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while not list(cache.glob("tmp*")) and time.time() < deadline and child.poll() is None:
            time.sleep(0.1)
    finally:
        os.killpg(child.pid, 9)
        child.wait()
    assert not _libraries(cache)  # nothing half-written where a library is looked for
    assert list(cache.glob("tmp*"))
    for leftover in cache.glob("tmp*"):
        old = time.time() - 3600
        os.utime(leftover, (old, old))
    done = _child(_SEARCH, _env(cache))
    assert done.returncode == 0, done.stderr
    assert not list(cache.glob("tmp*")) and len(_libraries(cache)) == 1


@pytest.mark.slow
@needs_kernel
def test_no_home_uses_a_private_temporary_directory() -> None:
    # No HOME, no XDG_CACHE_HOME, and no passwd entry for this user: Path.home() raises.
    code = (
        "import pwd\n"
        "def missing(uid):\n"
        "    raise KeyError(uid)\n"
        "pwd.getpwuid = missing\n"
        "from pathlib import Path\n"
        "try:\n"
        "    Path.home()\n"
        "except (RuntimeError, KeyError):\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('Path.home() still works')\n"
    ) + _SEARCH
    env = {k: v for k, v in _env(None).items() if k not in ("HOME", "XDG_CACHE_HOME")}
    done = _child(code, env)
    assert done.returncode == 0, done.stderr
    cache = Path(done.stdout.split("cache ", 1)[1].split()[0])
    assert cache.name.startswith("vqfunc-kernels-") and (cache.stat().st_mode & 0o077) == 0


@pytest.mark.slow
@needs_kernel
@pytest.mark.skipif(os.geteuid() != 0, reason="running as an unknown uid needs root")
def test_an_unknown_user_without_home_gets_the_kernels(tmp_path: Path) -> None:
    env = {k: v for k, v in _env(None).items() if k not in ("HOME", "XDG_CACHE_HOME")}
    try:
        done = _child(_SEARCH, env, user=54321, group=54321, cwd=str(tmp_path))
    except PermissionError:
        pytest.skip("the Python of the tests is not readable by another user")
    if "Permission denied" in done.stderr:
        pytest.skip("the test environment is not readable by another user")
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
@needs_kernel
def test_a_small_openmp_stack_is_enough(tmp_path: Path) -> None:
    done = _child(_SEARCH, _env(tmp_path, OMP_STACKSIZE="16K"))
    assert done.returncode == 0, done.stderr  # a segmentation fault with the minima on the stack


def test_the_cache_key_changes_with_the_compiler_version_and_the_isa() -> None:
    files = {"a.c": b"int x;"}

    def key(version: str, isa: str) -> str:
        return _cpu_kernel.cache_key("/usr/bin/cc", version, isa, ("-O3",), files)

    base = key("cc (GCC) 12.2.0", "x86_64+avx2+fma")
    assert base == key("cc (GCC) 12.2.0", "x86_64+avx2+fma")
    assert base != key("cc (GCC) 13.1.0", "x86_64+avx2+fma")
    assert base != key("cc (GCC) 12.2.0", "x86_64+avx2+fma+avx512f")


@pytest.mark.slow
@needs_kernel
def test_the_package_build_makes_a_library_that_is_verified_before_it_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    note = _cpu_kernel._build_spec.build_prebuilt(tmp_path, None)
    assert note.startswith("built"), note
    library = tmp_path / _cpu_kernel._build_spec.PREBUILT_NAME
    assert _cpu_kernel._verify_prebuilt(library) is None
    assert not list(tmp_path.glob("tmp*"))
    monkeypatch.setenv("VQFUNC_PREBUILT", str(library))
    _cpu_kernel.reset()
    try:
        assert _cpu_kernel.available()
        assert "built with the package" in _cpu_kernel.location()
    finally:
        _cpu_kernel.reset()
    # Tampered copies (never the loaded file: truncating a mapped library is a bus error).
    copy = tmp_path / "copy"
    copy.mkdir()
    library = Path(shutil.copy2(library, copy / library.name))
    record = Path(shutil.copy2(tmp_path / (library.name + ".sha256"), copy))
    size, digest, sources, threads = record.read_text().split()
    record.write_text(f"{size} {digest} {'0' * 64} {threads}\n")
    assert "other sources" in (_cpu_kernel._verify_prebuilt(library) or "")
    record.write_text(f"{size} {digest} {sources} {threads}\n")
    assert _cpu_kernel._verify_prebuilt(library) is None
    library.write_bytes(library.read_bytes()[:1000])
    assert "does not match" in (_cpu_kernel._verify_prebuilt(library) or "")
