"""Shared fixtures and settings of the test suite."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings

DATA_DIR = pathlib.Path(__file__).parent / "data"
PARITY_FILE = DATA_DIR / "vqtorch_parity.pt"

# Test tensors are tiny: one intra-op thread is as fast, and on a busy machine two OpenMP threads
# spin-waiting for each other make each small matmul about 1000x slower (measured: 27 ms vs
# 14 us for a 180 x 5 x 6 addmm under load). Tests of multi-threaded paths set threads themselves.
torch.set_num_threads(1)

# Property tests run on a shared 2-core CI machine: no per-example deadline (the first call of a
# torch op can be slow), modest example counts, and reproducible runs.
settings.register_profile(
    "vqfunc",
    deadline=None,
    max_examples=60,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# A long random search for local runs: VQFUNC_HYPOTHESIS_PROFILE=thorough pytest ...
settings.register_profile(
    "thorough", parent=settings.get_profile("vqfunc"), max_examples=1000, derandomize=False
)
settings.load_profile(os.environ.get("VQFUNC_HYPOTHESIS_PROFILE", "vqfunc"))


@pytest.fixture(scope="session")
def parity_records() -> dict[str, dict[str, Any]]:
    """vqtorch's reference results: case name -> record (the format is described in
    tests/integration/test_parity.py)."""
    return torch.load(PARITY_FILE, weights_only=False)


@pytest.fixture
def generator() -> torch.Generator:
    """A CPU generator with a fixed seed, fresh for every test."""
    return torch.Generator().manual_seed(0)


@pytest.fixture
def dynamo_counters() -> Iterator[Any]:
    """Fresh dynamo counters, and any recompile turned into an error."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield torch._dynamo.utils.counters
    torch._dynamo.reset()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` skip, with the reason, where no CUDA device is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (python -m vqfunc.bench --gpu-check)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
