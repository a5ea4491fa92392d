#!/usr/bin/env bash
# Renders docs/diagrams/*.puml to PNG beside each file, offline, with Debian's plantuml (and graphviz);
# scripts/ensure-tools.sh installs both. Commit the PNGs with the sources: tests/test_docs.py fails when a
# PNG does not embed the current source of its .puml.
#
# PlantUML writes the source into each PNG (an iTXt chunk "plantuml"). On Java 16 and later the old
# Debian build needs access to a JDK-internal class for that, hence --add-exports: without it the PNG
# would silently lack the source.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIAGRAMS="$ROOT/docs/diagrams"

log() { printf 'render-diagrams: %s\n' "$*" >&2; }

for tool in plantuml dot; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        log "$tool is missing: run scripts/ensure-tools.sh (installs plantuml and graphviz)"
        exit 1
    fi
done

shopt -s nullglob
sources=("$DIAGRAMS"/*.puml)
if [ "${#sources[@]}" -eq 0 ]; then
    log "no .puml files in $DIAGRAMS"
    exit 1
fi

export JDK_JAVA_OPTIONS="--add-exports=java.desktop/com.sun.imageio.plugins.png=ALL-UNNAMED"
# -failfast2: stop at the first syntax error instead of drawing an error image.
plantuml -failfast2 -tpng "${sources[@]}" 2> >(grep -v '^NOTE: Picked up JDK_JAVA_OPTIONS' >&2)
for source in "${sources[@]}"; do
    echo "rendered: ${source%.puml}.png"
done
