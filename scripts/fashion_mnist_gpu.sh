#!/usr/bin/env bash
# The Fashion-MNIST accuracy runs of docs/results.md on one GPU, all at once: ResNet-20 on the
# 60,000 training images for 100 epochs with random erasing and an EMA of the weights, seeds
# 0, 1 and 2 (STAGE `seeds`), or the anchors' 300-epoch recipe (configs/fashion_mnist.py:anchor)
# without and with random erasing, seed 0 (STAGE `anchor`). The runs share the GPU: the
# paper's small net is bound by kernel launches (docs/benchmarks.md), so several processes
# keep it busier than one. A run still going after SECONDS gets SIGTERM, saves a checkpoint
# and stops; the same command again resumes it, on the same machine or, after extracting
# OUT/fashion_mnist_STAGE_resume.tgz (below), on another.
#
#   bash scripts/fashion_mnist_gpu.sh OUT [STAGE] [SECONDS] [RUNS] [--config.key=value ...]
#
# Settings after RUNS go to every run (e.g. --config.num_train_steps=4 for a smoke test).
# Writes OUT/fashion_mnist_STAGE.tgz (each run's config, final evaluations, TensorBoard logs
# and log file; no checkpoints), OUT/fashion_mnist_STAGE.md (scripts/summarize_runs.py's
# table: final top-1 and best evaluation; how far an unfinished run got) and, when runs
# stopped before their end, OUT/fashion_mnist_STAGE_resume.tgz (scripts/pack_run.sh: those
# runs with their newest checkpoints, to resume them on another machine). The same runs on
# 2 CPU cores, one after the other: scripts/fashion_mnist_runs.sh. Data: data/fashion_mnist, else exported from the
# four idx files in data/fashion_mnist_idx/ (copy them there from
# /usr/share/datasets/fashion-mnist to carry them to a machine without them), else from
# /usr/share/datasets/fashion-mnist.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 1 ]]; then
  echo "usage: bash scripts/fashion_mnist_gpu.sh OUT [seeds|anchor] [SECONDS] [RUNS] [--config...]" >&2
  exit 2
fi
out="$1" stage="${2:-seeds}" seconds="${3:-480}" runs="${4:-runs}"
extra=("${@:5}")
case "$stage" in
  seeds) folder="$runs/fmnist_100ep" ;;
  anchor) folder="$runs/fmnist_anchor" ;;
  *)
    echo "error: STAGE is seeds or anchor, not '$stage'." >&2
    exit 2
    ;;
esac
mkdir -p "$out" "$folder"
py=$(command -v python || command -v python3)  # A lent GPU's image may have python3 alone.

if [[ ! -d data/fashion_mnist/train ]]; then
  source=/usr/share/datasets/fashion-mnist
  [[ -d data/fashion_mnist_idx ]] && source=data/fashion_mnist_idx
  "$py" scripts/export_idx.py "$source" data/fashion_mnist --classes fashion_mnist \
    --train_subset 10000
fi

# Several processes share one GPU's memory: none may take most of it at its start.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
start() {  # start NAME COMMAND...: in the background, its output in FOLDER/NAME.log
  local name="$1"
  shift
  echo "== $name: $* ($(date -u +%FT%TZ))"
  timeout -s TERM -k 120 "$seconds" "$@" >"$folder/$name.log" 2>&1 &
  pids+=("$!")
}
# The 100-epoch runs, as the runner's recipes experiment makes them, less --seeds.
recipes=("$py" -m resnet_jax.experiments.recipes --config configs/fashion_mnist.py
  --workdir "$folder" --variants random_erasing --config.num_epochs=100
  --config.ema_decay=0.999 "${extra[@]}")
pids=()
if [[ "$stage" == seeds ]]; then
  for seed in 0 1 2; do
    start "random_erasing_seed$seed" "${recipes[@]}" --seeds "$seed"
  done
else
  start baseline_seed0 "$py" -m resnet_jax.main --config configs/fashion_mnist.py:anchor \
    --workdir "$folder/baseline_seed0" "${extra[@]}"
  start random_erasing_seed0 "$py" -m resnet_jax.main --config configs/fashion_mnist.py:anchor \
    --workdir "$folder/random_erasing_seed0" --config.random_erasing=0.5 "${extra[@]}"
fi
failed=0
for pid in "${pids[@]}"; do
  wait "$pid" || failed=$((failed + 1))
done
for log in "$folder"/*.log; do
  echo "== $log (last lines)"
  tail -n 4 "$log"
done

if [[ "$stage" == seeds ]]; then
  "${recipes[@]}" --seeds 0,1,2 --table_only || true
fi
"$py" scripts/summarize_runs.py "$folder"/*_seed* --json_out "$folder/summary.json" \
  | grep '^|' >"$out/fashion_mnist_$stage.md" || true
cat "$out/fashion_mnist_$stage.md"
tar -czf "$out/fashion_mnist_$stage.tgz" --exclude=checkpoints \
  -C "$(dirname "$folder")" "$(basename "$folder")"
# The runs stopped before their end, with their newest checkpoints: a lent machine goes
# back when idle, so its runs/ may be gone by the next call.
unfinished=()
for workdir in "$folder"/*_seed*; do
  if [[ ! -f "$workdir/eval_results.json" ]] \
    && compgen -G "$workdir/checkpoints/[0-9]*" >/dev/null; then
    unfinished+=("$workdir")
  fi
done
if ((${#unfinished[@]})); then
  bash scripts/pack_run.sh "$out/fashion_mnist_${stage}_resume.tgz" "${unfinished[@]}"
  echo "== To resume them on another machine, extract that archive as the line above says," \
    "from the checkout's root (a relative RUNS), then run the same command."
fi
echo "== $failed of ${#pids[@]} runs stopped before the end (rerun the command to resume them)."
