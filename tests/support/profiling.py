"""Which of vqfunc's compiled kernels a call ran: the names they record in torch's profiler."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from torch.profiler import ProfilerActivity, profile


def kernel_calls(fn: Callable[[], Any]) -> tuple[Any, Counter[str]]:
    """Run `fn`; return its result and how often each `vqfunc.*` profiler range was entered
    (`vqfunc.cpu_kernel.nearest_codes`, `vqfunc.cpu_kernel.straight_through_forward`,
    `vqfunc.cpu_kernel.straight_through_backward`, `vqfunc.triton.nearest_codes`)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn()
    names = Counter(e.name for e in prof.events() if e.name.startswith("vqfunc."))
    return result, names
