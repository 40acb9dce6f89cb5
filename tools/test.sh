#!/usr/bin/env bash
# The project's test command: set up if needed, then pytest, mypy --strict and ruff.
# Arguments go to pytest. MAGSDK_LINT=0 runs pytest only (CI's second environment lints nothing twice);
# MAGSDK_VENV, MAGSDK_OLDEST and MAGSDK_DIFFUSERS choose the environment (tools/setup.sh).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${MAGSDK_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/magsdk" ] || [ "${MAGSDK_REINSTALL:-0}" = 1 ]; then
    bash tools/setup.sh
fi
"$venv/bin/python" -c "import diffusers, torch, transformers; print(f'tools/test.sh: diffusers {diffusers.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')"
set +e
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "tools/test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
[ "$rc" -eq 0 ] || exit "$rc"
if [ "${MAGSDK_LINT:-1}" = 0 ]; then
    echo "tools/test.sh: pytest passed (MAGSDK_LINT=0: mypy and ruff not run)"
    exit 0
fi
"$venv/bin/python" -m mypy --strict magsdk strategies
"$venv/bin/python" -m ruff check magsdk strategies tools tests
echo "tools/test.sh: all checks passed"
