#!/usr/bin/env bash
# GPU benchmark at LLaVA-1.5-7B's language-model shape (issue 15.5): one prepared script.
#
#   bash benchmarks/gpu.sh [--out DIR] [--smoke] [--dry-run]
#
# Builds a random-weight LLaVA on the GPU in bfloat16 whose language model has LLaVA-1.5-7B's
# shape (32 layers, hidden 4096, 32 heads, FFN 11008; a tiny CLIP tower, 576 image tokens) and
# runs `himap bench` on it: dense against every registered method (`--methods all`: a method added
# to the registry appears here without editing this file), each at its paper setting scaled to 32
# layers, plus the reference-style rows of every static method (`--reference all`), with SDPA;
# then the same without reference rows with flash attention when `flash-attn` is importable (or
# installable from a wheel). It also writes the FLOPs table of the same configurations
# (`himap flops --methods all`). Results: DIR/sdpa/, DIR/flash_attention_2/, DIR/flops_*.json.
#
#   --out DIR    where to write (default benchmarks/results/gpu)
#   --smoke      the same commands at a reduced shape on the CPU, in seconds (CI); also
#                HIMAP_BENCH_SMOKE=1
#   --dry-run    print the commands instead of running them
#
# Environment: PYTHON (default .venv/bin/python, else python3) runs `python -m himap_vlm`;
# HIMAP_BENCH_ARGS adds options to every `himap bench` call (e.g. "--repeats 20").
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="benchmarks/results/gpu"
SMOKE="${HIMAP_BENCH_SMOKE:-0}"
DRY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --smoke) SMOKE=1; shift ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "error: unknown option $1 (use --out DIR, --smoke, --dry-run)" >&2; exit 2 ;;
    esac
done

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
HIMAP=("$PYTHON" -m himap_vlm)

if [ "$SMOKE" = "1" ]; then
    # reduced shape on the CPU: the same commands, every method and reference row, one run each
    SHAPE=(--layers 4 --hidden 64 --heads 4 --kv-heads 4 --intermediate 128 --image-tokens 16 --patch-size 4)
    RUN=(--device cpu --dtype float32 --threads 1 --n 1 --repeats 1 --warmup 0 --max-new-tokens 2 --no-memory)
else
    # LLaVA-1.5-7B's language model; 24 x 24 patches of 14 px = 576 image tokens (LLaVA-1.5 at 336 px)
    SHAPE=(--layers 32 --hidden 4096 --heads 32 --kv-heads 32 --intermediate 11008 --image-tokens 576 --patch-size 14)
    RUN=(--device cuda --dtype bfloat16 --n 4 --repeats 8 --warmup 2 --max-new-tokens 8)
fi
# shellcheck disable=SC2206  # word splitting of the extra options is intended
EXTRA=(${HIMAP_BENCH_ARGS:-})

run() {  # print the command (on stderr: stdout may be a result file), then run it unless --dry-run
    { printf '+'; printf ' %q' "$@"; printf '\n'; } >&2
    if [ "$DRY" = "0" ]; then "$@"; fi
}

if [ "$DRY" = "0" ]; then mkdir -p "$OUT"; fi

# What time should follow: exact-convention prefill FLOPs of the same configurations at
# LLaVA-1.5-7B's dimensions and LLaVA-1.5's prompt layout, and in the papers' convention.
FLOPS_MODEL=(--preset llava-1.5-7b)
FLOPS_LAYOUT="35,576,60"
CONVENTIONS=(exact paper)
if [ "$SMOKE" = "1" ]; then CONVENTIONS=(exact); fi
for convention in "${CONVENTIONS[@]}"; do
    if [ "$DRY" = "0" ]; then
        run "${HIMAP[@]}" flops "${FLOPS_MODEL[@]}" --layout "$FLOPS_LAYOUT" --methods all --convention "$convention" \
            --json > "$OUT/flops_$convention.json"
    else
        run "${HIMAP[@]}" flops "${FLOPS_MODEL[@]}" --layout "$FLOPS_LAYOUT" --methods all --convention "$convention" --json
    fi
done

# SDPA: dense vs every registered method, plus every reference-style row
run "${HIMAP[@]}" bench --tiny "${SHAPE[@]}" "${RUN[@]}" --attn-implementation sdpa \
    --methods all --reference all "${EXTRA[@]}" --out "$OUT/sdpa"

# flash attention (engine rows only: the reference-style rows always run eager attention)
FLASH=("${HIMAP[@]}" bench --tiny "${SHAPE[@]}" "${RUN[@]}" --attn-implementation flash_attention_2
       --methods all --reference none "${EXTRA[@]}" --out "$OUT/flash_attention_2")
if [ "$SMOKE" = "1" ]; then
    echo "smoke run: no flash attention on the CPU" >&2
elif [ "$DRY" = "1" ]; then
    echo "# if flash-attn is importable (or installs from a prebuilt wheel):" >&2
    run "${FLASH[@]}"
elif "$PYTHON" -c "import flash_attn" >/dev/null 2>&1; then
    run "${FLASH[@]}"
else
    echo "flash-attn is not importable; trying a prebuilt wheel (no compilation)" >&2
    if "$PYTHON" -m pip install --quiet --only-binary=:all: --retries 0 --timeout 15 flash-attn >/dev/null 2>&1 \
        && "$PYTHON" -c "import flash_attn" >/dev/null 2>&1; then
        run "${FLASH[@]}"
    else
        echo "flash-attn is not installable here: the flash-attention rows are skipped" | tee "$OUT/flash_attention_2.skipped"
    fi
fi
echo "done: $OUT"
