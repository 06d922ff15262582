#!/usr/bin/env bash
# Set up a fresh environment, then run the demo or the tests.
#
#   bash dev.sh demo [hetermoe demo options]   # fine-tune the built-in tiny Mixtral, end to end
#   bash dev.sh test [pytest options]          # lint + the test suite (CPU; GPU tests run where CUDA is present)
#
# The environment lives in $HETERMOE_VENV (default .venv) and is reused when present. torch is installed
# first and pinned ($HETERMOE_TORCH, default 2.13.0): an unpinned torch would pull gigabytes of CUDA wheels
# onto a CPU machine. On a GPU machine, install the CUDA torch you want into the venv first; it is kept.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

VENV=${HETERMOE_VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_PIN=${HETERMOE_TORCH:-2.13.0}

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV"
    fi
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_PIN"
    fi
    "$VENV/bin/python" -m pip install --quiet -e ".[test]"
}

setup_test() {
    setup
    # DeepSpeed, for the ZeRO-2/3 cases of tests/test_distributed.py: an sdist whose setup.py imports torch. It is
    # built against the venv's pinned torch; with build isolation pip would fetch an unpinned torch to build it.
    if ! "$VENV/bin/python" -c "import deepspeed" 2>/dev/null; then
        DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install --quiet --no-build-isolation "deepspeed==0.19.8"
    fi
}

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
    demo)
        setup
        exec "$VENV/bin/hetermoe" demo "$@"
        ;;
    test)
        setup_test
        "$VENV/bin/ruff" check .
        exec "$VENV/bin/pytest" -q "$@"
        ;;
    *)
        echo "usage: bash dev.sh {demo|test} [options]" >&2
        exit 2
        ;;
esac
