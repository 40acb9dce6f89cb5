#!/usr/bin/env bash
# Set up (torch + magsdk) and run the main job.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/setup.sh"
venv="${MAGSDK_VENV:-$root/.venv}"
# The main job: inspect -> scaffold -> calibrate -> cached vs uncached on the bundled, trained
# digits FluxPipeline; writes magsdk-demo/demo-grid.png and magsdk-demo/demo-result.json.
"$venv/bin/magsdk" demo --out "${MAGSDK_DEMO_OUT:-magsdk-demo}" "$@"
