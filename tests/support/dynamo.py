"""What the `torch.compile` tests share (their `dynamo_counters` fixture is in conftest.py)."""

from __future__ import annotations

from typing import Any


def assert_one_graph(counters: Any) -> None:
    """No graph break, and exactly one graph captured."""
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
