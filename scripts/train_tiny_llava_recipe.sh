#!/usr/bin/env bash
# The recipe of the shipped tiny LLaVA: scripts/train_tiny_llava.py in five phases, each starting
# from the previous phase's final/ weights (see scripts/MODEL_CARD.md for why each phase exists).
# Every phase resumes from its checkpoint.pt when the script is run again, and a finished phase
# (final/ present) is skipped. About 2 hours on 2 CPU cores.
#
#   bash scripts/train_tiny_llava_recipe.sh [RUNS_DIR]      # default runs/; logs in RUNS_DIR/*/train.log
#
# The model to ship is RUNS_DIR/tiny-llava-p5/best:  make ship-model RUN=runs/tiny-llava-p5/best
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs}
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1

COMMON=(--threads 2 --freeze-vision --batch-size 16 --turns 10 --describe
        --eval-every 100 --val-n 500 --ckpt-minutes 3)

phase() {  # phase NAME ARGS...: run (or resume) one phase unless it has finished
    local name=$1
    shift
    mkdir -p "$RUNS/$name"
    if [ -f "$RUNS/$name/final/model.safetensors" ]; then
        echo "$name: done (final/ exists)"
        return
    fi
    echo "$name: training (log: $RUNS/$name/train.log)"
    "$PY" scripts/train_tiny_llava.py --out-dir "$RUNS/$name" "${COMMON[@]}" "$@" >> "$RUNS/$name/train.log" 2>&1
}

# 1. vision tower + projector alignment (stage 1), then the language model on all families.
phase tiny-llava --freeze-projector --seed 0 --vision-steps 600 --vision-lr 3e-3 --projector-steps 300 --init-std 0.06 \
    --lr 1e-3 --warmup 50 --max-steps 5000 --target 0.97
# 2. positions: object rows/columns in the description; spatial questions about "left of" and
#    "above" only (one direction per axis gives the answer a first-order dependence on positions).
phase tiny-llava-p2 --freeze-projector --init-from "$RUNS/tiny-llava/final" --seed 1 --describe-positions \
    --families exists,attribute,count,spatial,spatial,spatial,choice --spatial-relations left,above \
    --lr 1e-3 --warmup 50 --max-steps 2500 --stop-step 1300 --target 0.99
# 3. every relation (the vertical pair generalises here).
phase tiny-llava-p3 --freeze-projector --init-from "$RUNS/tiny-llava-p2/final" --seed 2 --describe-positions \
    --families exists,attribute,count,spatial,spatial,choice \
    --lr 7e-4 --warmup 50 --max-steps 3000 --stop-step 800 --target 0.97
# 4. the horizontal axis again from one direction ("left of"), keeping above/below.
phase tiny-llava-p4 --freeze-projector --init-from "$RUNS/tiny-llava-p3/final" --seed 3 --describe-positions \
    --families exists,attribute,count,spatial,spatial,spatial,choice --spatial-relations left,above,below \
    --lr 7e-4 --warmup 50 --max-steps 2000 --stop-step 900 --target 0.99
# 5. every relation, every family, to the end of the schedule (or the validation target); the
#    projector trains again (word embeddings stay frozen), so the image tokens' column codes can grow.
phase tiny-llava-p5 --init-from "$RUNS/tiny-llava-p4/final" --seed 4 --describe-positions \
    --families exists,attribute,count,spatial,spatial,spatial,choice \
    --lr 5e-4 --warmup 50 --max-steps 4000 --target 0.97
echo "done: $RUNS/tiny-llava-p5/best"
