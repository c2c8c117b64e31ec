"""A dependency-free progress bar on stderr."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], *, total: int | None, desc: str, enable: bool) -> Iterator[T]:
    """Yield `items`, drawing `desc [#####-----] i/total` on stderr when `enable`."""
    if not enable:
        yield from items
        return
    width = 30
    for count, item in enumerate(items, start=1):
        yield item
        if total:
            done = min(width, width * count // total)
            bar = "#" * done + "-" * (width - done)
            sys.stderr.write(f"\r{desc} [{bar}] {count}/{total}")
        else:
            sys.stderr.write(f"\r{desc} {count}")
        sys.stderr.flush()
    sys.stderr.write("\n")
    sys.stderr.flush()
