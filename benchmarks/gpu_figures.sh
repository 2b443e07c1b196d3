#!/usr/bin/env bash
# The GPU figures of docs/results.md in one run of about ten minutes on one accelerator (JAX, the default
# model and settings, UCSD Ped2 at 128x192), each step's output kept in OUT:
#
#     KERAS_BACKEND=jax bash benchmarks/gpu_figures.sh PREPARED OUT [TRAIN_MINUTES]
#
# PREPARED holds UCSDped2 as `data_preparation.py --size 128x192` writes it. The steps, most needed first:
#   1. train.py with the default settings (config/default.json, bf16) and --seed 2, the seed whose JAX
#      training once failed (train.py stops if an epoch moves no weight), for at most TRAIN_MINUTES
#      (default 5): OUT/UCSDped2, the model folder for pretrained/UCSDped2.
#   2. batch_scoring.py on the test videos with that model, timed whole (OUT/scored, OUT/scoring.log).
#   3. benchmarks/live_protocol.py: offline and live AUCs and the alarms (OUT/live_protocol.json).
#   4. benchmarks/benchmark.py: training frames/s and share of the bf16 peak, scored frames/s and the
#      10 fps cameras one accelerator keeps up with (OUT/benchmark.log).
# A failed step is reported and the next one runs; the exit code is the number of failed steps.
# Settings for a quick try on a CPU: CONFIG=cpu TRAIN_ARGS="--precision float32 --nb_epoch 2"
# BENCH_ARGS="--precisions float32 --batch_sizes 2 --steps 2 --frames 60 --score_videos 1 --score_length 20
# --score_batch 4 --streams 2" (BENCH_ARGS replaces the GPU's arguments below).
set -uo pipefail
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3}

if [[ $# -lt 2 || $# -gt 3 ]]; then
    echo "usage: bash benchmarks/gpu_figures.sh PREPARED OUT [TRAIN_MINUTES]" >&2
    exit 2
fi
MINUTES=${3:-5}
DATASET=${DATASET:-UCSDped2}
CONFIG=${CONFIG:-default}
BENCH_ARGS=${BENCH_ARGS:---precisions mixed_bfloat16 --batch_sizes 16 --steps 20 --frames 1440 --score_videos 8 --score_batch 64 --streams 64}
PYTHON=${PYTHON:-python3}
PREPARED=$(realpath -m "$1")
OUT=$(realpath -m "$2")
if [[ ! -f $PREPARED/$DATASET/metadata.json ]]; then
    echo "gpu_figures.sh: $PREPARED/$DATASET/metadata.json not found: give the folder data_preparation.py wrote" >&2
    exit 2
fi
if [[ -e $OUT/$DATASET ]]; then
    echo "gpu_figures.sh: $OUT/$DATASET exists: choose another OUT" >&2
    exit 2
fi
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
failed=0

step() {  # step NAME LOG COMMAND...: runs it, its output in OUT/LOG, its seconds and exit code on one line
    local name=$1 log=$OUT/$2 start=$SECONDS code
    shift 2
    "$@" >"$log" 2>&1
    code=$?
    echo "$name: exit $code in $((SECONDS - start)) s ($log)"
    if [[ $code -ne 0 ]]; then
        failed=$((failed + 1))
        tail -n 5 "$log"
    fi
}

"$PYTHON" -c "import keras; print('keras', keras.__version__, 'on', keras.backend.backend())"
data=(--preprocessed_data "$PREPARED" --dataset "$DATASET")
# shellcheck disable=SC2086  # TRAIN_ARGS and BENCH_ARGS are lists of arguments
step train train.log "$PYTHON" train.py --config "$CONFIG" "${data[@]}" --model_dir "$OUT/$DATASET" \
    --seed 2 --max_minutes "$MINUTES" ${TRAIN_ARGS:-}
if [[ -f $OUT/$DATASET/model.keras ]]; then
    step scoring scoring.log "$PYTHON" batch_scoring.py "${data[@]}" --model_dir "$OUT/$DATASET" \
        --scored_data "$OUT/scored"
    step live_protocol live_protocol.log "$PYTHON" benchmarks/live_protocol.py "${data[@]}" \
        --model_dir "$OUT/$DATASET" --out "$OUT/live_protocol.json"
fi
size=$("$PYTHON" -c "import json, sys; m = json.load(open(sys.argv[1])); print(f\"{m['height']}x{m['width']}x{m['channels']}\")" \
    "$PREPARED/$DATASET/metadata.json")
# shellcheck disable=SC2086
step benchmark benchmark.log "$PYTHON" benchmarks/benchmark.py --config "$CONFIG" --size "$size" $BENCH_ARGS
echo "failed steps: $failed"
exit "$failed"
