#!/usr/bin/env bash
# The README commands:  ./dev.sh demo   (set up, then run the whole flow locally on a tiny model)
#                       ./dev.sh serve  (the demo, then a local vLLM serving its published model until Ctrl-C)
#                       ./dev.sh test   (set up, then run the test suite; .ci/run calls this)
# Setup is idempotent: a virtual environment in .venv with the pinned set (requirements.lock), reinstalled
# only when the lock or pyproject.toml change.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

VENV=.venv
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    command -v python3.11 >/dev/null 2>&1 && PYTHON=python3.11
fi

setup() {
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        echo "dev.sh: Python 3.11 or newer is needed ($PYTHON is $("$PYTHON" --version 2>&1))" >&2
        exit 2
    fi
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    local stamp
    stamp="$VENV/.installed-$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)"
    if [ ! -f "$stamp" ]; then
        echo "dev.sh: installing the pinned dependency set into $VENV (first time: a few minutes)" >&2
        "$VENV/bin/python" -m pip install --quiet --upgrade pip </dev/null
        "$VENV/bin/python" -m pip install --quiet -r requirements.lock </dev/null
        "$VENV/bin/python" -m pip install --quiet --no-deps -e . </dev/null
        rm -f "$VENV"/.installed-*
        touch "$stamp"
    fi
}

command="${1:-}"
[ $# -gt 0 ] && shift
case "$command" in
    demo)
        setup
        exec "$VENV/bin/python" -m entrypoint demo "$@"
        ;;
    serve)
        setup
        bash scripts/ensure-vllm.sh >/dev/null
        exec "$VENV/bin/python" -m entrypoint.local_vllm "$@"
        ;;
    test)
        setup
        bash scripts/ensure-tools.sh
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    setup)
        setup
        ;;
    *)
        echo "usage: ./dev.sh demo [--storage DIR] | serve [--storage DIR] | test [pytest args] | setup" >&2
        exit 2
        ;;
esac
