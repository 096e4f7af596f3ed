#!/usr/bin/env bash
# The GPU measurements in one command, one table at the end (about 8 minutes on one H200):
#
#   bash benchmarks/gpu_suite.sh [--out DIR]     # on a machine with a CUDA GPU
#   bash benchmarks/gpu_suite.sh --dry-run       # the same steps with tiny shapes on the CPU (CI runs this)
#
# 1. training step, SD1.5-shaped at 512 px and SDXL-shaped at 1024 px, bf16: ours DoRA / LoRA vs peft DoRA / LoRA,
#    time and peak VRAM, gradient checkpointing off and on (benchmarks/train_speed.py)
# 2. QDoRA: peak VRAM and step time on an NF4 / int8 base (benchmarks/qdora.py), when present
# 3. inference: base / adapter toggled / adapter merged (benchmarks/inference.py)
# 4. the README's quickstart end to end (toy preset on builtin:toy + its evaluation)
# Every benchmark also writes JSON into DIR; benchmarks/gpu_summary.py table DIR prints the combined table.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
OUT=outputs/gpu_suite
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    *) echo "usage: bash benchmarks/gpu_suite.sh [--dry-run] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

if [ "$DRY" = 1 ]; then
  GPU="--device cpu --dtype fp32"
  TRAIN_SD15="--quick --resolution 64 --warmup 0 --steps 1"
  TRAIN_SDXL="--quick --sdxl --resolution 64 --warmup 0 --steps 1"
  QDORA="--dry-run"
  INFER="--device cpu --dtype fp32 --quick --rounds 1 --warmup 0 --steps 2"
  QUICK="--dry-run"
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: run with --dry-run')"
  GPU="--device cuda --dtype bf16"
  TRAIN_SD15="--resolution 512 --warmup 2 --steps 5"
  TRAIN_SDXL="--sdxl --resolution 1024 --warmup 2 --steps 4"
  QDORA="--device cuda --dtype bf16 --sdxl --resolution 1024"
  INFER="--device cuda --dtype fp16 --resolution 512 --steps 25 --rounds 3 --warmup 1"
  QUICK=""
fi

step() { echo; echo "== $1"; shift; "$@"; }
step "training step, SD1.5-shaped" "$PY" benchmarks/train_speed.py $GPU $TRAIN_SD15 --json "$OUT/train_sd15.json"
step "training step, SDXL-shaped" "$PY" benchmarks/train_speed.py $GPU $TRAIN_SDXL --json "$OUT/train_sdxl.json"
if [ -f benchmarks/qdora.py ]; then
  step "QDoRA" "$PY" benchmarks/qdora.py $QDORA --json "$OUT/qdora.json"
fi
step "inference" "$PY" benchmarks/inference.py $INFER --json "$OUT/inference.json"
step "quickstart" "$PY" benchmarks/gpu_summary.py quickstart "$OUT" $QUICK
echo
"$PY" benchmarks/gpu_summary.py table "$OUT"
