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


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_committed_notebooks_record_their_path_relative_to_the_repository(source):
    recorded = nbformat.read(source.with_suffix(".ipynb"), as_version=4).metadata.papermill
    assert recorded.input_path == recorded.output_path == f"notebooks/{source.stem}.ipynb"


def test_build_records_the_notebook_relative_to_the_repository(tmp_path, monkeypatch):
    """notebooks/build.py rewrites the absolute paths papermill records (a stand-in runs no kernel)."""
    import importlib.util

    from analysis import paths

    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOKS / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)

    def execute(input_path, output_path, **settings):
        notebook = nbformat.read(input_path, as_version=4)
        notebook.metadata["papermill"] = nbformat.from_dict({"input_path": str(input_path),
                                                             "output_path": str(output_path)})
        nbformat.write(notebook, output_path)
        return notebook

    monkeypatch.setattr(build.papermill, "execute_notebook", execute)
    monkeypatch.setattr(paths, "REPO_ROOT", tmp_path)
    (tmp_path / "notebooks").mkdir()
    (written,) = build.build(SOURCES[:1], out=tmp_path / "notebooks")
    recorded = nbformat.read(written, as_version=4).metadata.papermill
    assert recorded.input_path == recorded.output_path == f"notebooks/{SOURCES[0].stem}.ipynb"


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
