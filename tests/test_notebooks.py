"""The committed notebooks are their jupytext sources with outputs, and they run (papermill) small."""

from pathlib import Path

import jupytext
import nbformat
import papermill
import pytest

from analysis.study import compare

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SOURCES = sorted(p for p in NOTEBOOKS.glob("*.py") if p.name != "build.py")


def _cells(notebook):
    return [(c.cell_type, c.source) for c in notebook.cells if "injected-parameters" not in c.metadata.get("tags", [])]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_committed_notebooks_are_their_sources_with_outputs(source):
    committed = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    assert _cells(committed) == _cells(jupytext.read(source))
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert code[-1].get("outputs"), f"{source.stem} is committed without outputs"
    assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", []))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("nb") / "run"
    assert compare.main(["--methods", "lofi", "fastv", "random", "--keep", "0.5", "0.1", "--limit", "8",
                         "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_notebooks_execute(source, small_run, tmp_path):
    parameters = {"RUN_DIR": str(small_run), "SAMPLES": 2}
    if source.stem == "ipr_vs_consistency":
        parameters = {"RUN_DIR": None, "LIMIT": 6}  # the path that runs its own comparison
    notebook = tmp_path / f"{source.stem}.ipynb"
    source_notebook = jupytext.read(source)
    source_notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    jupytext.write(source_notebook, notebook)
    executed = papermill.execute_notebook(notebook, notebook, parameters=parameters, cwd=str(NOTEBOOKS.parent),
                                          kernel_name="python3", progress_bar=False)
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    assert any(o.get("output_type") in ("display_data", "execute_result") and "image/png" in o.get("data", {})
               for o in outputs)
