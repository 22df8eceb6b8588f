#!/usr/bin/env bash
# Run the whole test suite against one transformers release, in its own environment (.ci-venvs/NAME).
#
#   bash scripts/test_transformers.sh floor     # the floor declared in pyproject.toml
#   bash scripts/test_transformers.sh newest    # the newest release the package index serves (within the range)
#
# The README's `make test` uses constraints.txt instead (known-good versions); .ci/run runs all three.
set -euo pipefail
cd "$(dirname "$0")/.."
which="${1:?usage: test_transformers.sh floor|newest}"
venv=".ci-venvs/$which"
case "$which" in
    floor)
        spec=$(python3 -c "import re;r=re.search(r'\"(transformers[^\"]*)\"', open('pyproject.toml').read()).group(1);print('transformers=='+re.search(r'>=\s*([0-9.]+)', r).group(1))")
        ;;
    newest) spec=newest ;;
    *) echo "unknown target $which (floor or newest)" >&2; exit 2 ;;
esac
start=$(date +%s)
bash scripts/bootstrap.sh "$venv" --transformers "$spec"
version=$("$venv/bin/python" -c "import transformers; print(transformers.__version__)")
echo "== tests on transformers $version ($which; installed in $(( $(date +%s) - start )) s)"
HF_HUB_OFFLINE=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider
echo "== transformers $version ($which): passed in $(( $(date +%s) - start )) s"
