"""The analysis notebooks (jupytext percent format) execute top to bottom on the imported
published results, with the study injected as a parameter (papermill's convention: a cell
tagged `parameters`, overridden by a cell inserted after it)."""
from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat
import pytest
from ipykernel.kernelspec import install
from nbclient import NotebookClient

from benchmark.reference import DEFAULT_STUDY

PROJECT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((PROJECT / "analysis" / "notebooks").glob("*.py"))
KERNEL = "rftbench-tests"


def with_parameters(notebook: nbformat.NotebookNode, **values: object) -> nbformat.NotebookNode:
    """The notebook with a cell setting `values` right after its `parameters` cell."""
    tagged = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "a notebook has exactly one cell tagged `parameters`"
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    notebook.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    return notebook


def test_there_is_a_notebook_per_figure_group():
    assert {p.stem for p in NOTEBOOKS} == {"rankings", "correlations", "effects"}


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A kernel spec of this interpreter (the venv's), registered in a temporary Jupyter path."""
    prefix = tmp_path_factory.mktemp("jupyter")
    install(kernel_name=KERNEL, prefix=str(prefix))
    return str(prefix / "share" / "jupyter")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_on_the_published_results(path: Path, published_root: Path, kernel: str,
                                                monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("JUPYTER_PATH", kernel)
    monkeypatch.setenv("PYTHONPATH", str(PROJECT))
    notebook = with_parameters(jupytext.read(path), study=DEFAULT_STUDY, results_root=str(published_root))
    NotebookClient(notebook, timeout=600, kernel_name=KERNEL, resources={"metadata": {"path": str(PROJECT)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    # a cell ending in a figure expression displays it as an image
    figure_cells = [c for c in notebook.cells if c.cell_type == "code" and c.source.splitlines()[-1].startswith("figures.")]
    assert len(images) == len(figure_cells) > 0
