"""Build the notebooks from their sources in notebooks/_src/, run them, save them with outputs.

Each `_src/NN_name.py` is a plain Python file split into cells by `# %%` lines (code) and
`# %% [markdown]` lines (a markdown cell: the `# ` prefix of each line is dropped). This script
turns it into `NN_name.ipynb`, executes it top to bottom on CPU, and saves it with outputs.

    python notebooks/_build.py                 # every notebook
    python notebooks/_build.py 01 03           # only those whose name starts with 01 or 03
    python notebooks/_build.py --png-dir /tmp/figs   # also write every plot as a PNG

Edit the sources, not the .ipynb files.
"""

from __future__ import annotations

import argparse
import base64
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "_src"


def parse_cells(text: str) -> list[nbformat.NotebookNode]:
    """The cells of a `# %%`-delimited source."""
    cells: list[nbformat.NotebookNode] = []
    kind, lines = None, []

    def flush() -> None:
        if kind is None:
            return
        body = "\n".join(lines).strip("\n")
        if kind == "markdown":
            body = "\n".join(
                line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.split("\n")
            )
            cells.append(nbformat.v4.new_markdown_cell(body))
        else:
            cells.append(nbformat.v4.new_code_cell(body))

    for line in text.split("\n"):
        if line.startswith("# %%"):
            flush()
            kind = "markdown" if "[markdown]" in line else "code"
            lines = []
        elif kind is not None:
            lines.append(line)
    flush()
    return cells


def build(source: Path, png_dir: Path | None) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = parse_cells(source.read_text())
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    start = time.perf_counter()
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
    ).execute()
    seconds = time.perf_counter() - start
    target = HERE / f"{source.stem}.ipynb"
    nbformat.write(nb, target)
    print(f"{target.name}: ran in {seconds:.1f} s")
    if png_dir is not None:
        png_dir.mkdir(parents=True, exist_ok=True)
        count = 0
        for index, cell in enumerate(nb.cells):
            for output in cell.get("outputs", []):
                data = output.get("data", {})
                if "image/png" in data:
                    count += 1
                    path = png_dir / f"{source.stem}_cell{index:02d}_{count}.png"
                    path.write_bytes(base64.b64decode(data["image/png"]))
        print(f"  {count} plots written to {png_dir}")
    return target


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("prefixes", nargs="*", help="build only notebooks starting with these")
    parser.add_argument("--png-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    sources = sorted(SOURCES.glob("*.py"))
    if args.prefixes:
        sources = [s for s in sources if any(s.stem.startswith(p) for p in args.prefixes)]
    if not sources:
        sys.exit("no notebook source matched")
    for source in sources:
        build(source, args.png_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
