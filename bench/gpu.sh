#!/usr/bin/env bash
# The GPU bench in one command and one JSON (issue #15, item 6): on one GPU,
#   attack  ResNet-34, 224 px, population 40, 25 generations, 256 images (bench/attack.py)
#   mining  ResNet-18, 112 px, two pool sizes, steady state and end to end vs plain inference (bench/mine.py)
#   loader  ResNet-18, 224 px, AMP: streaming shards vs in-memory tensors (bench/train_throughput.py)
# and the goals: attack >= 30 images/s, mining >= 10,000 faces/s end to end, loader ratio >= 0.8.
#
#   bench/gpu.sh [OUT.json]                  # default gpu-bench.json
#   FERMINE_GPU_BENCH_SMOKE=1 bench/gpu.sh   # tiny sizes on the CPU: checks the script itself
#
# Each part's own JSON stays in the work folder printed at the start.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-gpu-bench.json}
WORK=${FERMINE_GPU_BENCH_WORK:-$(mktemp -d -t fermine-gpu-bench-XXXX)}
echo "gpu bench: work folder $WORK"

if [[ "${FERMINE_GPU_BENCH_SMOKE:-0}" == 1 ]]; then
  ATTACK=(--arch small_cnn --size 32 --images 16 --popsize 10 --generations 2 --device cpu --skip-scipy
          --repeats 1 --train-epochs 1 --train-per-class 8)
  MINE=(--sizes 256 512 --unique 64 --size 32 --input-size 32 --arch small_cnn --workers 1 --device cpu)
  LOADER=(--arch small_cnn --size 32 --images 256 --epochs 2 --repeats 1 --device cpu)
else
  ATTACK=(--arch resnet34 --size 224 --images 256 --popsize 40 --generations 25 --device cuda --skip-scipy)
  # one actor on the one GPU; its CPUs decode in parallel (--decode-threads) so JPEG keeps up
  MINE=(--sizes 100000 400000 --size 112 --input-size 112 --arch resnet18 --batch-size 512 --workers 1
        --cpus-per-worker 8 --decode-threads 8 --device cuda)
  LOADER=(--arch resnet18 --size 224 --images 4096 --epochs 3 --device cuda)
fi

t0=$SECONDS
"$PY" bench/attack.py "${ATTACK[@]}" --workdir "$WORK/attack" --json "$WORK/attack.json"
t1=$SECONDS
"$PY" bench/mine.py "${MINE[@]}" --workdir "$WORK/mine" --json "$WORK/mine.json"
t2=$SECONDS
"$PY" bench/train_throughput.py "${LOADER[@]}" --json "$WORK/loader.json"
t3=$SECONDS

"$PY" - "$WORK" "$OUT" "$((t1 - t0))" "$((t2 - t1))" "$((t3 - t2))" <<'EOF'
import json, sys

work, out, *secs = sys.argv[1:]
attack, mine, loader = (json.load(open(f"{work}/{n}.json")) for n in ("attack", "mine", "loader"))
largest = mine["results"][-1]
goals = {
    "attack >= 30 images/s": attack["batched_images_per_s"] >= 30,
    "mining end to end >= 10000 faces/s": largest["e2e_images_per_s"] >= 10000,
    "loader ratio >= 0.8": loader["ratio_steady"] >= 0.8,
}
report = {"seconds": dict(zip(("attack", "mine", "loader"), map(int, secs))), "total_seconds": sum(map(int, secs)),
          "attack": attack, "mine": mine, "loader": loader, "goals": goals}
json.dump(report, open(out, "w"), indent=2)
print(f"\n{'part':<8}{'figure':<46}{'value':>12}  goal")
print(f"{'attack':<8}{'images/s':<46}{attack['batched_images_per_s']:>12.1f}  >= 30")
for r in mine["results"]:
    print(f"{'mine':<8}{'faces/s end to end, pool ' + str(r['pool']):<46}{r['e2e_images_per_s']:>12.0f}  >= 10000")
    print(f"{'mine':<8}{'ratio to plain inference, pool ' + str(r['pool']):<46}{r['ratio_e2e']:>12.2f}")
print(f"{'loader':<8}{'stream / in-memory (steady)':<46}{loader['ratio_steady']:>12.3f}  >= 0.8")
print(f"total {report['total_seconds']} s (goal < 480 s on one GPU); "
      + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in goals.items()))
print(f"written: {out}")
EOF
