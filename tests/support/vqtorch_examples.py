"""vqtorch's example scripts and README snippet, adapted to run here, and their records.

The sources are read from vqtorch's checkout (`../shared/vqtorch` beside the repository) and
changed only where this machine needs it, the same way for vqtorch and for `vqfunc.vqtorch`:

- the imports name `package` (`vqtorch`, or `vqfunc.vqtorch` for the compatibility layer);
- `.cuda()` is dropped;
- MNIST (torchvision) becomes scikit-learn's bundled digits, scaled to [-1, 1] as the examples'
  transform scales MNIST, with the same `DataLoader`;
- the training scripts run `steps` iterations instead of 300 or 1000;
- `tqdm`'s `trange` and `print` are recorders, and the numbers they show are formatted with
  nine significant digits instead of one to three, so that the record holds them exactly;
- the README's `>>> ...` output line is dropped (it is not Python; the tests check it);
- they run in float64 (see `run`).

`run(source, ...)` executes an adapted script and returns its record: the lines it printed,
one entry per training run (every step's numbers, and a digest of the model at the end) and a
digest of the layer, `z_q` and `misc` at each quantization-error print and at the end.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

STEPS = 25
EXAMPLES = (
    "autoencoder.py",
    "classification.py",
    "experimental_inplace_update.py",
    "experimental_group_affine.py",
    "test.py",
)
_NUMBER = re.compile(r"[-+]?\d+\.\d+e[-+]\d+")


def readme_snippet(readme: str) -> tuple[str, list[str]]:
    """The Python block of vqtorch's README under "Example usage", and its `>>>` lines."""
    section = readme.split("## Example usage", 1)[1]
    block = section.split("```python", 1)[1].split("```", 1)[0]
    lines = block.splitlines()
    outputs = [line[len(">>>") :].strip() for line in lines if line.startswith(">>>")]
    code = "\n".join(line for line in lines if not line.startswith(">>>"))
    return code, outputs


def adapt(source: str, package: str, *, steps: int = STEPS) -> str:
    """`source` with the changes listed in the module docstring."""
    out = []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith(("from torchvision", "from tqdm")) or stripped.startswith(
            "transform = transforms."
        ):
            continue
        if stripped.startswith("import vqtorch"):
            line = line.replace("import vqtorch", f"import {package} as vqtorch")
        elif stripped.startswith("from vqtorch"):
            line = line.replace("from vqtorch", f"from {package}", 1)
        line = line.replace(".cuda()", "")
        line = re.sub(r"datasets\.MNIST\([^)]*\)", "DIGITS", line)
        line = re.sub(r"^train_iter = \d+", f"train_iter = {steps}", line)
        line = re.sub(r":\.\d+f\}", ":.9e}", line)
        out.append(line)
    return "\n".join(out) + "\n"


def digits() -> torch.utils.data.TensorDataset:
    """scikit-learn's digits as `(images [1797, 1, 8, 8] in [-1, 1], labels)`."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target, dtype=torch.long)
    return torch.utils.data.TensorDataset((images - 0.5) / 0.5, labels)


def digest(values: dict[str, Any]) -> dict[str, Any]:
    """Per tensor: shape, dtype, and float64 sum and sum of squares (or the values when small
    or integer-valued sums for integer tensors)."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        if not isinstance(value, Tensor):
            out[name] = value
            continue
        value = value.detach()
        entry: dict[str, Any] = {"shape": tuple(value.shape), "dtype": str(value.dtype)}
        as_double = value.double()
        entry["sum"] = float(as_double.sum())
        entry["sum_sq"] = float(as_double.square().sum())
        if value.numel() <= 16:
            entry["values"] = value.clone()
        out[name] = entry
    return out


class _Run:
    """What `trange(n)` returns: iterates, collects descriptions, digests the model at the end."""

    def __init__(self, n: int, namespace: dict[str, Any], runs: list[dict[str, Any]]) -> None:
        self.n, self.namespace, self.runs = n, namespace, runs
        self.steps: list[list[float]] = []

    def __iter__(self) -> Iterator[int]:
        yield from range(self.n)
        model: nn.Module = self.namespace["model"]
        self.runs.append({"steps": self.steps, "model": digest(dict(model.state_dict()))})

    def set_description(self, text: str) -> None:
        self.steps.append([float(v) for v in _NUMBER.findall(text)])


def run(
    source: str,
    *,
    dataset: torch.utils.data.TensorDataset | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> dict[str, Any]:
    """Execute an adapted script from a fresh global seed; return its record.

    The script runs with `dtype` as torch's default dtype (and the digits in it): in float64
    both libraries' searches pick the true nearest code, where in float32 their different
    roundings may decide a near-tie differently, after which two trainings part ways.
    """
    if dataset is not None:
        images, labels = dataset.tensors
        dataset = torch.utils.data.TensorDataset(images.to(dtype), labels)
    runs: list[dict[str, Any]] = []
    printed: list[str] = []
    snapshots: list[dict[str, Any]] = []
    namespace: dict[str, Any] = {"__name__": "__example__", "DIGITS": dataset}

    def record_print(*args: Any, **kwargs: Any) -> None:
        text = " ".join(str(a) for a in args)
        printed.append(text)
        if text.startswith(">>> quantization error"):
            misc = {k: v for k, v in namespace["vq_dict"].items() if k != "perplexity"}
            snapshots.append(
                {
                    "error": [float(v) for v in _NUMBER.findall(text)],
                    "layer": digest(dict(namespace["vq_layer"].state_dict())),
                    "z_q": digest({"z_q": namespace["z_q"]}),
                    "misc": digest(misc),
                    "misc_keys": list(namespace["vq_dict"]),
                }
            )

    namespace["print"] = record_print
    namespace["trange"] = lambda n: _Run(n, namespace, runs)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        exec(compile(source, "<vqtorch example>", "exec"), namespace)
    finally:
        torch.set_default_dtype(previous)
    final = None
    if "vq_dict" in namespace:
        final = {
            "layer": digest(dict(namespace["vq_layer"].state_dict())),
            "z_q": digest({"z_q": namespace["z_q"]}),
            "misc": digest({k: v for k, v in namespace["vq_dict"].items() if k != "perplexity"}),
            "misc_keys": list(namespace["vq_dict"]),
        }
    return {"printed": printed, "runs": runs, "snapshots": snapshots, "final": final}


def example_path(vqtorch_dir: Path, name: str) -> Path:
    return vqtorch_dir / "examples" / name
