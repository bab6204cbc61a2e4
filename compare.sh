#!/usr/bin/env bash
# The main job: compare pruning methods against the unpruned model on the bundled defaults, into reports/<run>/.
# Installs what it needs on first use. Arguments go to `python -m analysis.compare` (default: the README's job).
source "$(dirname "$0")/scripts/install.sh"
(( $# )) || set -- --methods lofi lvpruning fastv
exec "$PYTHON" -m analysis.compare "$@"
