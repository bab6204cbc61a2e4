"""``python -m analysis.shapes``: the command of ``analysis.benchmark.shapes`` (see its docstring)."""

import sys

from analysis.benchmark.shapes import main

if __name__ == "__main__":
    sys.exit(main())
