#!/usr/bin/env bash
# The tests (CPU only, no network): lint, then pytest. Installs what it needs on first use.
# Arguments go to pytest, e.g. `./test.sh -m "not slow"` for the fast lane.
source "$(dirname "$0")/scripts/install.sh"
"$PYTHON" -m ruff check .
exec "$PYTHON" -m pytest -q "$@"
