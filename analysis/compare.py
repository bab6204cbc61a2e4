"""``python -m analysis.compare``: the command of ``analysis.study.compare`` (see its docstring)."""

import sys

from analysis.study.compare import main

if __name__ == "__main__":
    sys.exit(main())
