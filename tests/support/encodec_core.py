"""The `encodec` package's quantization modules, loaded without the package's `__init__`.

`import encodec` also imports its audio model, which needs a `torchaudio` built for the same
torch; the quantizer (`encodec/quantization/core_vq.py`) needs only torch, einops and the
package's `distrib.py`. This loads those under a private package name, leaving `sys.modules`'
`encodec` untouched.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

_ALIAS = "_encodec_reference"


def load_core_vq() -> types.ModuleType | None:
    """`encodec.quantization.core_vq`, or None when the package (or einops) is not installed."""
    if importlib.util.find_spec("einops") is None:
        return None
    spec = importlib.util.find_spec("encodec")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    if not (root / "quantization" / "core_vq.py").is_file():
        return None
    for name, path in ((_ALIAS, root), (f"{_ALIAS}.quantization", root / "quantization")):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(path)]
            sys.modules[name] = package
    return importlib.import_module(f"{_ALIAS}.quantization.core_vq")
