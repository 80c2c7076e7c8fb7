#!/usr/bin/env bash
# Create .venv and install gpt2train into it: torch first (pinned, so pip never swaps in another
# build), then the project, with optional extras: `bash scripts/install.sh test`.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install --quiet -e ".${extras:+[$extras]}"
echo "gpt2train installed in .venv (run .venv/bin/gpt2train --help)"
