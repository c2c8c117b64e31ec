"""The cost of LFQ's entropy loss at large code counts."""

from __future__ import annotations

import statistics
from typing import Any

import torch

from vqfunc.bench._timing import _MIB, PeakMemory, _time
from vqfunc.lfq import LFQConfig
from vqfunc.lfq import quantize as lfq_quantize


def lfq_check(
    bits: int, rows: int, device: torch.device, dtype: torch.dtype, repeats: int
) -> dict[str, float]:
    """Median time (ms) and peak extra memory (MiB) of the LFQ loss at `bits` on `rows` random
    vectors (default `LFQConfig` otherwise): forward without autograd, and forward+backward;
    and the MiB of the float32 `rows x 2**bits` table that a full computation would hold."""
    cfg = LFQConfig(bits=bits, dim=-1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, bits, generator=gen).to(device=device, dtype=dtype)
    meter = PeakMemory(device)

    def forward() -> Any:
        with torch.no_grad():
            return lfq_quantize(x, cfg)[1].loss

    def forward_backward() -> Any:
        leaf = x.detach().requires_grad_()
        lfq_quantize(leaf, cfg)[1].loss.backward()
        return leaf.grad

    report: dict[str, float] = {}
    for label, fn in (("forward", forward), ("forward+backward", forward_backward)):
        times = _time(fn, device, repeats)
        _, peak = meter.measure(fn)
        report[f"{label} ms"] = 1e3 * statistics.median(times)
        report[f"{label} peak MiB"] = (peak or 0) / _MIB
    report["full table MiB"] = rows * (1 << bits) * 4 / _MIB
    return report
