#!/usr/bin/env bash
# Create a virtual environment and install himap-vlm (editable, with dev extras) into it. Idempotent.
#
#   bash scripts/bootstrap.sh [VENV] [--transformers SPEC]
#
# VENV defaults to .venv. Without --transformers, every package comes from constraints.txt (the
# known-good versions that `make demo` / `make test` use, whatever day they run). With it, the
# constraints are not used and transformers is installed as SPEC (e.g. "transformers==5.10.1" for
# the declared floor, or "newest" for the newest release the package index serves within the
# range pyproject.toml declares): that is how .ci/run tests the supported range. torch then stays
# the build already installed (the machine's CPU wheel when there is one).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
VENV=".venv"
SPEC=""
while [ $# -gt 0 ]; do
    case "$1" in
        --transformers) SPEC="$2"; shift 2 ;;
        *) VENV="$1"; shift ;;
    esac
done
if ! command -v uv >/dev/null 2>&1; then
    "$PY" -m pip install --quiet uv
fi
if [ ! -x "$VENV/bin/python" ]; then
    uv venv --quiet --python "$PY" "$VENV"
fi
UVPIP=(uv pip install --quiet --python "$VENV/bin/python")
# torch: prefer a CPU wheel shipped with the machine (no multi-GB CUDA download on CPU boxes).
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    wheel="$(ls /opt/wheels/torch-*-cp3*.whl 2>/dev/null | head -n1 || true)"
    if [ -n "$wheel" ]; then
        "${UVPIP[@]}" "$wheel"
    fi
fi
if [ -z "$SPEC" ]; then
    "${UVPIP[@]}" -c constraints.txt -e ".[dev]"
    exit 0
fi
# Range tests: torch stays the build installed above (a platform choice: CPU or CUDA wheel, several
# GB); everything else resolves afresh, the newest that fits (the way a user's install would).
keep_torch="$(mktemp)"
trap 'rm -f "$keep_torch"' EXIT
if "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    "$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$keep_torch"
fi
if [ "$SPEC" = "newest" ]; then
    range=$("$VENV/bin/python" -c "import re;print(re.search(r'\"(transformers[^\"]*)\"', open('pyproject.toml').read()).group(1))")
    "${UVPIP[@]}" -c "$keep_torch" --upgrade -e ".[dev]" "$range"
else
    "${UVPIP[@]}" -c "$keep_torch" -e ".[dev]" "$SPEC"
fi
