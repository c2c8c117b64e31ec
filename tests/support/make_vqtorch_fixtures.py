"""Write the vqtorch reference records: `tests/data/vqtorch_compat.pt.gz`, `vqtorch_api.json`.

Run by hand (not in CI: vqtorch is not installable here) from the repository root, with
vqtorch's checkout beside it (`../shared/vqtorch`, or give its path):

    python tests/support/make_vqtorch_fixtures.py [--vqtorch ../shared/vqtorch]

vqtorch imports `string-color` (`pip install string-color==1.2.3`, not a vqfunc dependency) to
colour its messages; without it a pass-through stands in, which changes no number.

What it records, all computed by vqtorch itself on CPU:

- `cases`: every training case of `support.vqtorch_cases` (plain, grouped shared and
  separate with and without affine, residual, dead-code replacement, in-place optimizer,
  every `norm` / `cb_norm`, k-means warm-up), run for 25 steps: initial and final
  `state_dict`, the first step's outputs, `misc` and gradients, every step's codes and loss;
- `examples`: vqtorch's example scripts as `support.vqtorch_examples` adapts them (digits for
  MNIST, 25 steps, no CUDA): every training step's printed numbers and a digest of each model;
- `readme`: the README's snippet, likewise;
- `functions`: the outputs of vqtorch's norms, dists, entropy, pooling layers and affine map
  (both modes) on fixed inputs (`support.vqtorch_cases.functions`);
- `api.json`: vqtorch's public names, classes and signatures (`support.vqtorch_api`).

Where vqtorch cannot run on CPU it is patched here, and the tests patch `vqfunc.vqtorch` the
same way: torchpq (CUDA only) is replaced by a module whose `KMeans` returns
`support.vqtorch_cases.stand_in_centroids`. No other vqtorch path is patched: the records
cover what vqtorch runs on CPU (its cosine search raises `NameError` and is not recorded).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import subprocess
import sys
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from support import vqtorch_api, vqtorch_cases, vqtorch_examples  # noqa: E402

DATA = REPO / "tests" / "data"


def vqtorch_commit(checkout: Path) -> str:
    source = checkout / "SOURCE.md"
    if source.is_file():
        for word in source.read_text().split():
            if len(word) >= 7 and all(c in '0123456789abcdef(),"' for c in word):
                return word.strip('(),"')
    try:
        return (
            subprocess.check_output(["git", "-C", str(checkout), "rev-parse", "HEAD"])
            .decode()
            .strip()
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vqtorch", type=Path, default=REPO.parent / "shared" / "vqtorch")
    args = parser.parse_args()
    checkout = args.vqtorch.resolve()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    vqtorch = vqtorch_cases.import_vqtorch(checkout)

    api = vqtorch_api.collect(checkout / "vqtorch")
    (DATA / "vqtorch_api.json").write_text(json.dumps(api, indent=1, sort_keys=True) + "\n")

    cases = {name: vqtorch_cases.train(vqtorch, case) for name, case in vqtorch_cases.CASES.items()}
    dataset = vqtorch_examples.digits()
    examples = {}
    for name in vqtorch_examples.EXAMPLES:
        source = vqtorch_examples.example_path(checkout, name).read_text()
        adapted = vqtorch_examples.adapt(source, "vqtorch")
        examples[name] = vqtorch_examples.run(adapted, dataset=dataset)
    code, outputs = vqtorch_examples.readme_snippet((checkout / "README.md").read_text())
    readme = vqtorch_examples.run(vqtorch_examples.adapt(code, "vqtorch"))
    readme["outputs"] = outputs
    records = {
        "functions": vqtorch_cases.functions(vqtorch),
        "meta": {
            "vqtorch_commit": vqtorch_commit(checkout),
            "torch": torch.__version__,
            "kmeans": "torchpq's KMeans replaced by support.vqtorch_cases.stand_in_centroids",
        },
        "cases": cases,
        "examples": examples,
        "readme": readme,
    }
    path = DATA / "vqtorch_compat.pt.gz"
    buffer = io.BytesIO()
    torch.save(records, buffer)
    # gzip: most of the records are small tensors, whose per-tensor overhead compresses well.
    path.write_bytes(gzip.compress(buffer.getvalue(), mtime=0))
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB) and {DATA / 'vqtorch_api.json'}")


if __name__ == "__main__":
    main()
