"""Argument types shared by the package's command lines (`python -m vqfunc.demo`,
`python -m vqfunc.bench`)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An argument that must be an integer >= 1; argparse names the argument in the error."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected an integer >= 1")
    return value
