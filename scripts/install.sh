# Sourced by compare.sh and test.sh: install the project and its test tools into the current python3 on first use.
# torch is pinned to the CPU build's version first, so pip never pulls the CUDA packages (gigabytes);
# a stamp of pyproject.toml's hash skips the install once it is done for this file.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
stamp=".install-stamp"
want="$($PYTHON -c 'import hashlib,sys; print(hashlib.sha256(open("pyproject.toml","rb").read()).hexdigest(), sys.executable)')"
if [[ ! -f $stamp || "$(cat $stamp)" != "$want" ]] || ! $PYTHON -c "import lofi, analysis, torch, pytest" 2>/dev/null; then
    echo "installing lofi-vtp and its dependencies into $($PYTHON -c 'import sys; print(sys.executable)') (once)" >&2
    $PYTHON -m pip install -q torch==2.13.0
    $PYTHON -m pip install -q -e ".[dev]"
    echo "$want" > "$stamp"
fi
