#!/usr/bin/env bash
# Set up (CPU torch + magsdk) and run the main job.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/setup.sh"
venv="${MAGSDK_VENV:-$root/.venv}"
"$venv/bin/magsdk" plan --strategy flux --steps 28
