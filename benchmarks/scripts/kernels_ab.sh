#!/bin/bash
# The kernels A/B of issue 26 (README study 3): the same artifacts trained with
# `--kernels auto` (the NCHWc variants where this onnxruntime has them) and
# `--kernels portable`, each job a fresh `actcomp-device train` process, alternating, ROUNDS
# rounds; prints each summary's kernels, median step, its split and working set.
#   bash benchmarks/scripts/kernels_ab.sh [ROUNDS]
set -e
ROUNDS=${1:-3}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
BIN=$REPO/.venv/bin
OUT=$(mktemp -d)
M="--model ../shared/weights/tt_mcunet-5fps_int8dq.json --weights ../shared/weights/tt_mcunet-5fps_int8dq.npz --num-classes 2 --batch-size 32 --input-size 128 --force"
cd "$REPO"
for n in 4 42; do for method in vanilla hosvd asi; do
  eps=$([ $method = vanilla ] || echo "--eps 0.8")
  "$BIN/actcomp" export $M --layers $n --method $method $eps -o "$OUT/$method-$n" > /dev/null
done; done
for round in $(seq "$ROUNDS"); do for n in 4 42; do for method in vanilla hosvd asi; do
  for kernels in auto portable; do
    "$BIN/actcomp-device" train "$OUT/$method-$n" --data ../shared/data/hymenoptera_train.npz \
        --val-data ../shared/data/hymenoptera_val.npz --max-steps 8 --threads 2 \
        --kernels $kernels --out "$OUT/run" --summary "$OUT/s.json" > /dev/null 2>&1
    "$BIN/python" -c "import json, sys; s = json.load(open(sys.argv[1]))
split = ', '.join(f'{k} {1e3 * v:.0f}' for k, v in s['step_split_seconds'].items())
print(f\"round {sys.argv[2]} N={sys.argv[3]:2} {sys.argv[4]:7} {s['kernels']:8} step \"
      f\"{1e3 * s['median_step_seconds']:.0f} ms ({split}), working set \"
      f\"{s['working_set_bytes'] / 2 ** 20:.1f} MiB\")" "$OUT/s.json" $round $n $method
  done
done; done; done
rm -rf "$OUT"
