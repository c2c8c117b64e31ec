"""The backend policy: read from the environment once, changed with `vqfunc.kernels.use`,
reported by `vqfunc.kernels.status()`; a fallback warns once, and `require` makes it an error."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import vqfunc
from vqfunc._kernels import cpu as _cpu_kernel
from vqfunc._kernels import policy as _policy
from vqfunc._search import nearest_codes, uses_cpu_kernel


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    # VQFUNC_PREBUILT=0: the cache decides, not the library built with the package.
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "VQFUNC_PREBUILT": "0", **env}
    return subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=300
    )


def test_use_changes_the_backend_and_restores_it() -> None:
    vectors, codebook = torch.randn(20, 4), torch.randn(7, 4)
    before = vqfunc.kernels.settings()
    with vqfunc.kernels.use(cpu="torch") as inside:
        assert inside.cpu == "torch" and inside.cuda == before.cuda
        assert not uses_cpu_kernel(vectors, codebook)
        entries = [e for e in vqfunc.kernels.status() if e.device == "cpu"]
        assert all(e.backend == "torch" for e in entries)
    assert vqfunc.kernels.settings() == before
    assert uses_cpu_kernel(vectors, codebook) == _cpu_kernel.available()


def test_use_rejects_unknown_choices() -> None:
    with pytest.raises(ValueError, match="cpu"), vqfunc.kernels.use(cpu="fast"):
        pass
    with pytest.raises(ValueError, match="cuda"), vqfunc.kernels.use(cuda="cuda"):
        pass
    before = vqfunc.kernels.settings()
    for bad in (0, -3, 2.5, True, "many"):
        with (
            pytest.raises(ValueError, match=f"chunk_elements: .*got {bad!r}"),
            vqfunc.kernels.use(chunk_elements=bad),  # type: ignore[arg-type]
        ):
            pass
        assert vqfunc.kernels.settings() == before


def test_use_changes_only_what_it_names_and_nests() -> None:
    before = vqfunc.kernels.settings()
    with vqfunc.kernels.use(chunk_elements=64) as outer:
        assert outer.chunk_elements == 64 and outer.cpu == before.cpu
        with vqfunc.kernels.use(cpu="torch") as inner:
            assert inner.chunk_elements == 64 and inner.cpu == "torch"
        assert vqfunc.kernels.settings() == outer
    assert vqfunc.kernels.settings() == before


def test_status_covers_every_device_dtype_and_operation() -> None:
    entries = vqfunc.kernels.status()
    keys = {(e.device, e.dtype, e.operation) for e in entries}
    assert len(keys) == len(entries) == 2 * 4 * 2
    by_key = {(e.device, e.dtype, e.operation): e for e in entries}
    double = by_key[("cpu", "float64", "straight_through")]
    assert double.backend == "torch" and "float32" in double.reason
    single = by_key[("cpu", "float32", "nearest_codes")]
    if _cpu_kernel.available():
        assert single.backend == "compiled", single
    else:
        assert single.backend == "torch" and single.reason
    assert all(str(e).startswith(f"{e.device} {e.dtype} {e.operation}: ") for e in entries)


@pytest.mark.slow
def test_environment_chooses_torch() -> None:
    done = _run(
        "import vqfunc\n"
        "s = vqfunc.kernels.status()\n"
        "assert vqfunc.kernels.settings().cpu == 'torch'\n"
        "assert all(e.backend == 'torch' for e in s), s\n",
        VQFUNC_CPU_KERNEL="0",
    )
    assert done.returncode == 0, done.stderr


def _untrusted_cache(tmp_path: Path) -> Path:
    cache = tmp_path / "shared"
    cache.mkdir()
    cache.chmod(0o777)  # writable by anyone: a library there could be planted
    return cache


_SEARCH = (
    "import torch, warnings, vqfunc\n"
    "from vqfunc._search import nearest_codes, torch_nearest_codes\n"
    "v, c = torch.randn(30, 8), torch.randn(20, 8)\n"
    "with warnings.catch_warnings(record=True) as caught:\n"
    "    warnings.simplefilter('always')\n"
    "    for _ in range(3):\n"
    "        codes, _ = nearest_codes(v, c)\n"
    "assert torch.equal(codes, torch_nearest_codes(v, c))\n"
    "ours = [str(w.message) for w in caught if 'compiled CPU kernels' in str(w.message)]\n"
    "print(len(ours)); print(ours[0] if ours else '')\n"
)


@pytest.mark.slow
def test_fallback_warns_once_and_names_the_cause(tmp_path: Path) -> None:
    done = _run(_SEARCH, VQFUNC_CACHE_DIR=str(_untrusted_cache(tmp_path)))
    assert done.returncode == 0, done.stderr
    count, message = done.stdout.splitlines()[:2]
    assert count == "1"
    assert "group- or world-writable" in message and "using torch" in message


@pytest.mark.slow
def test_require_turns_the_fallback_into_an_error(tmp_path: Path) -> None:
    done = _run(
        _SEARCH, VQFUNC_CACHE_DIR=str(_untrusted_cache(tmp_path)), VQFUNC_CPU_KERNEL="require"
    )
    assert done.returncode != 0
    assert "RuntimeError" in done.stderr and "world-writable" in done.stderr


def test_require_in_a_block(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VQFUNC_PREBUILT", "0")  # so that the cache decides
    monkeypatch.setenv("VQFUNC_CACHE_DIR", str(_untrusted_cache(tmp_path)))
    _cpu_kernel.reset()
    _policy.reset()
    try:
        vectors, codebook = torch.randn(10, 4), torch.randn(5, 4)
        with vqfunc.kernels.use(cpu="require"), pytest.raises(RuntimeError, match="writable"):
            nearest_codes(vectors, codebook)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            nearest_codes(vectors, codebook)
            nearest_codes(vectors, codebook)
        assert len([w for w in caught if "compiled CPU kernels" in str(w.message)]) == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with vqfunc.kernels.use(cpu="torch"):  # chosen, not a fallback: no warning
                nearest_codes(vectors, codebook)
    finally:
        _cpu_kernel.reset()
        _policy.reset()
    assert stat.S_IMODE(os.stat(tmp_path / "shared").st_mode) == 0o777
