"""`python -m vqfunc.bench --gpu-check` without a device says so; its table reads right."""

from __future__ import annotations

import pytest
import torch

from vqfunc import bench
from vqfunc.bench._gpu_check import GpuRow, format_gpu_table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without GPU")
def test_without_cuda_it_says_so_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--gpu-check"]) == 2
    assert "no CUDA device" in capsys.readouterr().out


def test_the_table_shows_each_backend_and_the_triton_over_torch_ratio() -> None:
    times = {
        (backend, name): seconds * (2.0 if backend == "triton" else 1.0)
        for backend in ("torch", "triton")
        for name, seconds in (("search", 0.001), ("fwd", 0.002), ("fwd+bwd", 0.004))
    }
    table = format_gpu_table([GpuRow((8192, 64, 1024), torch.float16, times, 0.9987)])
    head, _, row = table.splitlines()
    assert "search ms" in head and "triton" in head and "ratio" in head
    cells = row.split()
    assert cells[:4] == ["8192", "64", "1024", "float16"]
    assert cells[5:8] == ["1.00", "2.00", "2.00"] and cells[9:12] == ["2.00", "4.00", "2.00"]
    assert cells[-1] == "0.9987"
