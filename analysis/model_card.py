"""``python -m analysis.model_card``: the command of ``analysis.bundled.card`` (see its docstring)."""

import sys

from analysis.bundled.card import main

if __name__ == "__main__":
    sys.exit(main())
