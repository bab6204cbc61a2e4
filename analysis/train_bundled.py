"""``python -m analysis.train_bundled``: the command of ``analysis.bundled.train`` (see its docstring)."""

import sys

from analysis.bundled.train import main

if __name__ == "__main__":
    sys.exit(main())
