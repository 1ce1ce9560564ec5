#!/usr/bin/env bash
# One command for a machine with one NVIDIA GPU and 16 cores: bench/gpu.py at Llama-2 7B
# shapes (and 13B if time allows), random weights, nothing downloaded. Under 8 minutes.
#   bash bench/gpu.sh [bench/gpu.py flags...]        e.g. --sizes 7b --levels 0,0.3
# Results: a Markdown table on stdout and bench/results/gpu-<date>.json.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
if [ -z "${PYTHON:-}" ] && [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; fi

# Only the repository travels, so dovetail may not be installed. Its package layout maps
# workers/ -> dovetail.workers and protocol/ -> dovetail.protocol; rebuild that mapping from
# symlinks and run from there (running from the repo root would import ./dovetail without
# its subpackages). Worker processes inherit the working directory and PYTHONPATH.
RUN_DIR="$REPO"
if ! (cd /tmp && "$PY" -c "import dovetail.workers.replay" 2>/dev/null); then
    SHIM="$(mktemp -d /tmp/dovetail-shim.XXXXXX)"
    trap 'rm -rf "$SHIM"' EXIT
    mkdir "$SHIM/dovetail"
    ln -s "$REPO"/dovetail/*.py "$SHIM/dovetail/"
    ln -s "$REPO/workers" "$SHIM/dovetail/workers"
    ln -s "$REPO/protocol" "$SHIM/dovetail/protocol"
    ln -s "$REPO/bench" "$SHIM/bench"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    RUN_DIR="$SHIM"
fi
cd "$RUN_DIR"
"$PY" -c "import torch; print('torch', torch.__version__, '| cuda:', torch.cuda.is_available() and torch.cuda.get_device_name(0), '| threads', torch.get_num_threads())"
mkdir -p "$REPO/bench/results"
# 465 s leaves room for start-up inside the 8 minutes; results are written after each size.
timeout -k 10 465 "$PY" -m bench.gpu --out-dir "$REPO/bench/results" --budget-s 400 "$@"
