"""``python -m analysis.evaluate``: the command of ``analysis.study.evaluate`` (see its docstring)."""

import sys

from analysis.study.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
