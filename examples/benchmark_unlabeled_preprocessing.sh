#!/usr/bin/env bash
# Cases per minute of nnUNetv2_tak_preprocess_unlabeled for several -np values (and, with SHARDS=N, N shard
# processes started together), on a synthetic dataset at the default synthetic geometry (48 x 96 x 96 voxels).
# Each run writes into a fresh nnUNet_preprocessed, so every case is preprocessed.
#
#   bash examples/benchmark_unlabeled_preprocessing.sh WORKDIR [NUM_CASES=64] [NP_VALUES="1 2"] [REPEATS=1]
#   SHARDS=2 bash examples/benchmark_unlabeled_preprocessing.sh WORKDIR 64 1
#
# Prints one line per run: wall time of the whole command (with Python/torch start-up) and of the preprocessing
# loop alone (from the progress bar), in cases per minute. Results and the machine they came from:
# examples/UNLABELED_PREPROCESSING.md.
set -euo pipefail
WORK=${1:?usage: $0 WORKDIR [NUM_CASES] [NP_VALUES] [REPEATS]}
CASES=${2:-64}
NPS=${3:-1 2}
REPEATS=${4:-1}
SHARDS=${SHARDS:-0}
BIN=$(dirname "$(command -v python)")
D=Dataset601_TAKShardBench
export nnUNet_raw=$WORK/nnUNet_raw nnUNet_results=$WORK/nnUNet_results
mkdir -p "$nnUNet_raw" "$nnUNet_results" "$WORK/plans"
if [ ! -f "$WORK/plans/$D/nnUNetPlans.json" ]; then
  python - "$nnUNet_raw" "$CASES" <<'EOF'
import sys
from nnunetv2_tak.synthetic import generate_dataset
generate_dataset(sys.argv[1], 601, "TAKShardBench", num_training=4, num_unlabeled=int(sys.argv[2]), seed=0)
EOF
  nnUNet_preprocessed=$WORK/plans "$BIN/nnUNetv2_plan_and_preprocess" -d 601 -c 3d_fullres -np 1 --no_pp \
    > "$WORK/plan.log" 2>&1
fi
N=$(ls "$nnUNet_raw/$D/imagesUnlabeled" | wc -l)
fresh() {  # a new nnUNet_preprocessed holding only the plans
  rm -rf "$1" && mkdir -p "$1/$D" && cp "$WORK/plans/$D/"{dataset.json,nnUNetPlans.json} "$1/$D/"
}
report() {  # label, seconds for the command, load average before, log file(s)
  loop=$(grep -ho "[0-9]*/[0-9]* \[[0-9:]*<" "${@:4}" | awk -F'[[<]' '{k = split($2, t, ":"); s = 0;
         for (i = 1; i <= k; i++) s = s * 60 + t[i]; if (s > m) m = s} END {print m + 0}')
  python -c "n, w, l = $N, $2, $loop; print(f'$1: {n} cases, command {w:.1f} s = {60 * n / w:.1f} cases/min; '
             f'loop {l} s = {60 * n / max(l, 1):.1f} cases/min (load average before: $3)')"
}
for rep in $(seq "$REPEATS"); do
  for np in $NPS; do
    export nnUNet_preprocessed=$WORK/pp_np$np
    fresh "$nnUNet_preprocessed"
    load=$(cut -d' ' -f1 /proc/loadavg)
    t0=$(date +%s.%N)
    if [ "$SHARDS" -gt 0 ]; then
      pids=()
      for i in $(seq 0 $((SHARDS - 1))); do
        "$BIN/nnUNetv2_tak_preprocess_unlabeled" -d 601 -c 3d_fullres -np "$np" --shard "$i" --num-shards "$SHARDS" \
          > "$WORK/run_np${np}_shard$i.log" 2>&1 &
        pids+=($!)
      done
      wait "${pids[@]}"
      logs=("$WORK"/run_np"${np}"_shard*.log)
      label="$SHARDS shards x -np $np"
    else
      "$BIN/nnUNetv2_tak_preprocess_unlabeled" -d 601 -c 3d_fullres -np "$np" > "$WORK/run_np$np.log" 2>&1
      logs=("$WORK/run_np$np.log")
      label="-np $np"
    fi
    t1=$(date +%s.%N)
    report "run $rep, $label" "$(python -c "print($t1 - $t0)")" "$load" "${logs[@]}"
  done
done
