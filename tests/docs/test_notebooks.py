"""Every notebook in notebooks/ runs from top to bottom on CPU, and is committed with outputs.

Each notebook is executed in memory (the file on disk is not rewritten) by nbclient with an
ipykernel "python3" kernel of the interpreter running the tests, from the notebooks folder as
working directory, with a per-cell timeout; any cell error fails the test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("ipykernel.kernelspec")

NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))

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
    }
    assert expected <= names, f"missing notebooks: {sorted(expected - names)}"


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
