"""Every notebook in notebooks/ holds the cells of its source, runs from top to bottom on CPU,
and is committed with outputs.

Each notebook NN_name.ipynb is built from its source notebooks/_src/NN_name.py (jupytext's
percent format); both are read with jupytext and must hold the same cells in the same order.

Each notebook is executed in memory (the file on disk is not rewritten) by nbclient with an
ipykernel "python3" kernel of the interpreter running the tests, from the notebooks folder as
working directory, with a per-cell timeout; any cell error fails the test.
"""

from __future__ import annotations

import difflib
import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("ipykernel.kernelspec")
jupytext = pytest.importorskip("jupytext")

NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
SOURCES_DIR = NOTEBOOKS_DIR / "_src"
SOURCES = sorted(SOURCES_DIR.glob("*.py"))

# The README's commands, run from the repository root.
REBUILD = (
    "rebuild the notebooks: "
    "jupytext --from _src//py:percent --to ipynb --update notebooks/_src/*.py && "
    "jupytext --set-kernel python3 --execute notebooks/*.ipynb"
)

# Generous against a slow CI machine; a cell that takes this long is a bug in the notebook.
CELL_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A JUPYTER_PATH folder whose "python3" kernel is this interpreter, not any other."""
    root = tmp_path_factory.mktemp("jupyter")
    kernelspec.write_kernel_spec(path=root / "kernels" / "python3")
    spec = json.loads((root / "kernels" / "python3" / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    return root


def test_notebooks_exist() -> None:
    names = {path.stem for path in NOTEBOOKS}
    expected = {
        "01_quickstart",
        "02_functional_training",
        "03_layer_and_warmup",
        "04_from_vqtorch",
        "05_codec_bitrates",
    }
    assert expected <= names, f"missing notebooks: {sorted(expected - names)}"


def test_every_notebook_has_a_source_and_every_source_a_notebook() -> None:
    notebooks = {path.stem for path in NOTEBOOKS}
    sources = {path.stem for path in SOURCES}
    assert not notebooks - sources, (
        f"notebooks without a source in _src/: {sorted(notebooks - sources)}"
    )
    assert not sources - notebooks, f"sources without a notebook: {sorted(sources - notebooks)}"


def _cells(path: Path) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in jupytext.read(path).cells]


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_notebook_matches_its_source(source: Path) -> None:
    """The committed notebook holds its source's cells: neither was edited without the other."""
    notebook = NOTEBOOKS_DIR / f"{source.stem}.ipynb"
    assert notebook.is_file(), f"{source.name} has no notebook; {REBUILD}"
    expected, found = _cells(source), _cells(notebook)
    for index, (want, got) in enumerate(zip(expected, found, strict=False)):
        if got != want:
            diff = difflib.unified_diff(
                f"[{want[0]}]\n{want[1]}".splitlines(),
                f"[{got[0]}]\n{got[1]}".splitlines(),
                f"_src/{source.name}",
                notebook.name,
                lineterm="",
            )
            pytest.fail(f"cell {index} differs:\n" + "\n".join(diff) + f"\n{REBUILD}")
    assert len(found) == len(expected), (
        f"{notebook.name} has {len(found)} cells, _src/{source.name} {len(expected)}; {REBUILD}"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_with_outputs(path: Path) -> None:
    """Browsing the repository shows the results: every code cell ran, and there are plots."""
    nb = nbformat.read(path, as_version=4)
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code_cells, f"{path.name} has no code cell"
    not_run = [i for i, cell in enumerate(code_cells) if cell.get("execution_count") is None]
    assert not not_run, f"{path.name}: code cells {not_run} were saved without running"
    counts = [cell.execution_count for cell in code_cells]
    assert counts == sorted(counts), f"{path.name}: cells were not run top to bottom: {counts}"
    images = [
        output
        for cell in code_cells
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert images, f"{path.name} holds no saved plot"
    errors = [
        output for cell in code_cells for output in cell.outputs if output.output_type == "error"
    ]
    assert not errors, f"{path.name} was saved with an error output"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path: Path, kernel_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))
    # Plots render off-screen; no display is needed.
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(f"{path.name} failed:\n{error}")
