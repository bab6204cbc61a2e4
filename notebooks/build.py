"""Regenerate the committed notebooks from their sources and run them.

    python notebooks/build.py            # notebooks/*.ipynb from notebooks/*.py, executed (papermill)

Each notebook's source is a jupytext percent script (``notebooks/<name>.py``, reviewable as plain
Python); its ``parameters`` cell holds the settings papermill may override (``RUN_DIR``, ``LIMIT``,
``SAMPLES``). The committed ``.ipynb`` carry their outputs; they run from the repository root.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jupytext
import nbformat
import papermill

from analysis.paths import portable

HERE = Path(__file__).resolve().parent
SOURCES = sorted(p for p in HERE.glob("*.py") if p.name != "build.py")


def build(sources=SOURCES, parameters: dict | None = None, out: Path = HERE, kernel: str = "python3") -> list[Path]:
    """Convert each source to ``out/<name>.ipynb`` and execute it there with ``parameters`` (the paths papermill
    records in it relative to the repository when inside it)."""
    written = []
    for source in sources:
        path = Path(out) / f"{source.stem}.ipynb"
        notebook = jupytext.read(source)
        notebook.metadata["kernelspec"] = {"name": kernel, "display_name": "Python 3", "language": "python"}
        jupytext.write(notebook, path)
        executed = papermill.execute_notebook(path, path, parameters=parameters or {}, cwd=str(HERE.parent),
                                              kernel_name=kernel, progress_bar=False)
        # papermill records the paths it was given; the committed notebooks hold them relative to the repository
        executed.metadata.papermill.update(input_path=portable(path), output_path=portable(path))
        nbformat.write(executed, path)
        written.append(path)
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.parse_args()
    for p in build():
        print("wrote", p)
