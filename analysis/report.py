"""``python -m analysis.report``: the command of ``analysis.study.report`` (see its docstring)."""

import sys

from analysis.study.report import main

if __name__ == "__main__":
    sys.exit(main())
