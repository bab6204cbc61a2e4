"""``python -m analysis.train_lvpruning``: the command of ``analysis.bundled.train_lvpruning`` (see its docstring)."""

import sys

from analysis.bundled.train_lvpruning import main

if __name__ == "__main__":
    sys.exit(main())
