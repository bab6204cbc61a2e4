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
import papermill

HERE = Path(__file__).resolve().parent
SOURCES = sorted(p for p in HERE.glob("*.py") if p.name != "build.py")


def build(sources=SOURCES, parameters: dict | None = None, out: Path = HERE, kernel: str = "python3") -> list[Path]:
    """Convert each source to ``out/<name>.ipynb`` and execute it there with ``parameters``."""
    written = []
    for source in sources:
        path = Path(out) / f"{source.stem}.ipynb"
        notebook = jupytext.read(source)
        notebook.metadata["kernelspec"] = {"name": kernel, "display_name": "Python 3", "language": "python"}
        jupytext.write(notebook, path)
        papermill.execute_notebook(path, path, parameters=parameters or {}, cwd=str(HERE.parent), kernel_name=kernel,
                                   progress_bar=False)
        written.append(path)
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.parse_args()
    for p in build():
        print("wrote", p)
