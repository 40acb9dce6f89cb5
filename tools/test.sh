#!/usr/bin/env bash
# The project's test command: set up if needed, then pytest, mypy --strict and ruff.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${MAGSDK_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/magsdk" ] || [ "${MAGSDK_REINSTALL:-0}" = 1 ]; then
    bash tools/setup.sh
fi
set +e
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "tools/test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
[ "$rc" -eq 0 ] || exit "$rc"
"$venv/bin/python" -m mypy --strict magsdk strategies
"$venv/bin/python" -m ruff check magsdk strategies tools tests
echo "tools/test.sh: all checks passed"
