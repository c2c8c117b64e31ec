"""Launching a worker script once per rank (gloo, CPU), as a test failure, never a hang."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest


def launch(
    worker: Path,
    args_for_rank: Callable[[int], Sequence[str]],
    *,
    world: int,
    timeout_s: float,
    what: str,
) -> None:
    """Run `python worker *args_for_rank(rank)` for every rank at once; each must exit 0.

    One thread per process (the ranks share the machine's cores); the output of a failing or
    hanging rank ends up in the failure message.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), *args_for_rank(rank)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        for rank in range(world)
    ]
    logs = []
    try:
        for rank, proc in enumerate(procs):
            try:
                log, _ = proc.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{what}: rank {rank} did not finish within {timeout_s} s (hang)")
            logs.append(log.decode(errors="replace"))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, log) in enumerate(zip(procs, logs, strict=True)):
        assert proc.returncode == 0, f"{what}: rank {rank} failed:\n{log[-4000:]}"
