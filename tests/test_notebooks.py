"""The committed notebooks match their sources and run (nbclient) on a small comparison."""

import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))
import build  # noqa: E402


@pytest.mark.parametrize("name", list(build.NOTEBOOKS))
def test_committed_notebooks_match_their_sources_and_have_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert [c.source for c in nb.cells] == [src for _, src in build.NOTEBOOKS[name]]
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("outputs") for c in code[-1:]), f"{name} is committed without outputs"
    assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", []))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from analysis import compare
    out = tmp_path_factory.mktemp("nb") / "run"
    assert compare.main(["--methods", "lofi", "fastv", "random", "--keep", "0.5", "0.1", "--limit", "8",
                         "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(build.NOTEBOOKS))
def test_notebooks_execute(name, small_run):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    env = {"RUN_DIR": str(small_run), "NOTEBOOK_SAMPLES": "2"}
    if name == "ipr_vs_consistency.ipynb":
        env = {"NOTEBOOK_LIMIT": "6"}  # the path that runs its own comparison
    build.run(nb, env, timeout=600)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any(o.get("output_type") in ("display_data", "execute_result") and "image/png" in o.get("data", {})
               for o in outputs)
