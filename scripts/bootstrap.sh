#!/usr/bin/env bash
# Create .venv and install himap (editable, with dev extras) into it. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
if ! command -v uv >/dev/null 2>&1; then
    "$PY" -m pip install --quiet uv
fi
if [ ! -x .venv/bin/python ]; then
    uv venv --quiet --python "$PY" .venv
fi
# torch: prefer a CPU wheel shipped with the machine (no multi-GB CUDA download on CPU boxes).
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    wheel="$(ls /opt/wheels/torch-*-cp3*.whl 2>/dev/null | head -n1 || true)"
    if [ -n "$wheel" ]; then
        uv pip install --quiet --python .venv/bin/python "$wheel"
    fi
fi
uv pip install --quiet --python .venv/bin/python -e ".[dev]"
