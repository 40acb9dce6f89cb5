#!/usr/bin/env bash
# Issue 8's GPU check as one prepared command for a lent GPU machine (the device tool's `run`).
#
# That machine has Python 3.12 with torch but not diffusers or pydantic; they travel as wheels in .whl/
# (git-ignored). Here, once (the versions of .venv):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl diffusers==0.42.1 pydantic==2.14.4 pydantic_core==2.50.5 typing-inspection==0.4.5 \
#       annotated-types==0.8.0 importlib_metadata==10.2.0
#
# Then, with the device tool: run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=590).
# It rewrites the "GPU" section of docs/benchmarks.md there and returns it under $OUT, with the logs; copy
# $OUT/benchmarks.md over docs/benchmarks.md here (only that section differs). bench_overhead writes its section
# after each mode, so a run stopped by the time limit still returns the eager table, marked incomplete.
#
# Arguments replace the benchmark's (for a dry run here: DOC=/tmp/b.md bash tools/gpu_check.sh --sizes tiny
# --modes eager,compiled --steps 8 --rounds 5).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/magsdk-gpu-check}"
DOC="${DOC:-docs/benchmarks.md}"
LIMIT_S="${LIMIT_S:-540}"
mkdir -p "$OUT"
python=python3
[ -x .venv/bin/python ] && [ -z "${GPU_CHECK_SYSTEM_PYTHON:-}" ] && python=.venv/bin/python
if [ "$python" = python3 ] && compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "gpu_check: installing the carried wheels failed" >&2; exit 1; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
if ! "$python" - <<'EOF' 2>&1 | tee "$OUT/env.txt"; then
import diffusers, pydantic, torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, pydantic {pydantic.__version__}, {gpu}")
EOF
    echo "gpu_check: $python cannot import diffusers, pydantic and torch (above). Download the wheels into .whl/" \
         "as this script's header says and pass carry=[\".whl\"] to the device tool's run." >&2
    exit 2
fi
if [ "$#" -gt 0 ]; then
    args=("$@")
else
    args=(--full --device cuda --dtype bfloat16 --rounds 5)
fi
timeout "$LIMIT_S" "$python" tools/bench_overhead.py "${args[@]}" --out "$DOC" --json "$OUT/bench-overhead.json" \
    2>&1 | tee "$OUT/bench-overhead.log"
rc=${PIPESTATUS[0]}
[ -f "$DOC" ] && cp "$DOC" "$OUT/benchmarks.md"
echo "gpu_check: bench_overhead exit status $rc (124: stopped at ${LIMIT_S} s; what it measured is in the section)"
exit "$rc"
