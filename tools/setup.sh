#!/usr/bin/env bash
# Create .venv (if missing) with torch 2.13.0 (the CPU build where pip finds one; see README) and magsdk with its dev extra.
# Usage: source tools/setup.sh   (or bash tools/setup.sh)
#   MAGSDK_VENV=path        the environment (default .venv)
#   MAGSDK_OLDEST=1         install the oldest diffusers and transformers pyproject.toml supports
#                           (tools/oldest_pins.py), as CI's second environment does
#   MAGSDK_DIFFUSERS=spec   install this diffusers instead, e.g. MAGSDK_DIFFUSERS="diffusers==0.38.0"
# With either, the `test` extra is installed instead of `dev`: dev's cache-dit needs diffusers >= 0.36
# (the tests that use cache-dit skip without it).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MAGSDK_VENV:-$root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
"$venv/bin/python" -m pip install -q "torch==2.13.0"
pins=()
if [ "${MAGSDK_OLDEST:-0}" = 1 ]; then
    while IFS= read -r pin; do pins+=("$pin"); done < <("$venv/bin/python" "$root/tools/oldest_pins.py")
fi
if [ -n "${MAGSDK_DIFFUSERS:-}" ]; then
    pins+=("$MAGSDK_DIFFUSERS")
fi
if [ "${#pins[@]}" -gt 0 ]; then
    "$venv/bin/python" -m pip install -q -e "$root[test]" "${pins[@]}"
    echo "magsdk installed in $venv with ${pins[*]}"
else
    "$venv/bin/python" -m pip install -q -e "$root[dev]"
    echo "magsdk installed in $venv"
fi
