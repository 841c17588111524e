#!/bin/bash
# The memory A/Bs of issues 27-28 (README study 5): the same jobs (HOSVD, vanilla, asi) through the CLIs, each a fresh
# process, a checkout BEFORE (e.g. `git worktree add --detach /tmp/before <commit>`) beside
# AFTER (default: this checkout), alternating, ROUNDS rounds; prints each summary's step time,
# baseline, working set (with the memory plan's prediction and its ranks: "seen", "bound" or
# None for a method without ranks) and peak RSS.
#   bash benchmarks/scripts/memory_ab.sh /tmp/before [AFTER] [ROUNDS]
set -e
BEFORE=$1; AFTER=${2:-$(cd "$(dirname "$0")/../.." && pwd)}; ROUNDS=${3:-2}
PY=$AFTER/.venv/bin/python
OUT=$(mktemp -d)
M="--model ../shared/weights/tt_mcunet-5fps_int8dq.json --weights ../shared/weights/tt_mcunet-5fps_int8dq.npz --num-classes 2 --force"
JOBS=("n4:--layers 4 --method hosvd --eps 0.8 --batch-size 32 --input-size 128:8"
      "n4v:--layers 4 --method vanilla --batch-size 32 --input-size 128:8"
      "n42:--layers 42 --method hosvd --eps 0.8 --batch-size 32 --input-size 128:8"
      "n42v:--layers 42 --method vanilla --batch-size 32 --input-size 128:8"
      "n42a:--layers 42 --method asi --eps 0.8 --batch-size 32 --input-size 128:8"
      "paper:--layers 42 --method hosvd --eps 0.8 --batch-size 64 --input-size 224:5"
      "papera:--layers 42 --method asi --eps 0.8 --batch-size 64 --input-size 224:5")
for tree in before after; do
  dir=$([ $tree = before ] && echo "$BEFORE" || echo "$AFTER")
  for job in "${JOBS[@]}"; do
    IFS=: read -r name flags steps <<< "$job"
    cli=$([ -d "$dir/actcomp_edge/host" ] && echo actcomp_edge.host.cli || echo actcomp_edge.cli)
    (cd "$dir" && $PY -m $cli export $M $flags -o "$OUT/$tree-$name" > /dev/null)
  done
done
for round in $(seq "$ROUNDS"); do
  for job in "${JOBS[@]}"; do
    IFS=: read -r name flags steps <<< "$job"
    for tree in before after; do
      dir=$([ $tree = before ] && echo "$BEFORE" || echo "$AFTER")
      (cd "$dir" && $PY -m device_runner.cli train "$OUT/$tree-$name" \
          --data ../shared/data/hymenoptera_train.npz --val-data ../shared/data/hymenoptera_val.npz \
          --max-steps "$steps" --threads 2 --summary "$OUT/$tree-$name-r$round.json" \
          --out "$OUT/run" > /dev/null 2>&1)
      $PY -c "import json, sys; s = json.load(open(sys.argv[1])); m = 2 ** 20
print(f\"round {sys.argv[2]} {sys.argv[3]:6} {sys.argv[4]:6} step {1e3 * s['median_step_seconds']:.0f} ms, \"
      f\"baseline {s['baseline_rss_bytes'] / m:.1f}, working set {s['working_set_bytes'] / m:.1f} \"
      f\"(predicted {s['predicted_working_set_bytes'] / m:.1f}, {s.get('predicted_ranks')}), \"
      f\"peak {s['peak_rss_bytes'] / m:.1f} MiB\")" "$OUT/$tree-$name-r$round.json" "$round" "$name" "$tree"
    done
  done
done
