#!/usr/bin/env bash
# The Fashion-MNIST runs behind docs/results.md, one after the other, in RUNS (default runs/).
#
#   bash scripts/fashion_mnist_runs.sh [RUNS] [STAGE]
#
# STAGE: all (the default), or one part alone: figures (figure 6 and what chased it, the
# 10- and 30-epoch accuracy, DenseNet), seeds (the three 100-epoch runs) or anchor (the
# anchors' 300-epoch recipe).
#
# Rerunning it skips what finished (a workdir with eval_results.json, or a finished run of the
# degradation experiment) and resumes a killed run from its last checkpoint, so it can be
# stopped at any point and started again (on a machine that will not outlive the runs, stop
# it with SIGTERM and scripts/pack_run.sh carries the unfinished run to the next one). Needs
# the image folder data/fashion_mnist (scripts/export_idx.py, see configs/fashion_mnist.py).
# On a 2-core EPYC VM: about 6 hours to the DenseNet run (the three 30-epoch runs take about
# an hour each), then about 6 for figure 6 at 6,000 iterations, 6 for the warm-up runs, 11
# for the two ResNet-110 runs of the chase, 4 for the last two, 10 to 20 for the three
# 100-epoch runs and 22 to 40 for the two 300-epoch runs of the anchors' recipe (minutes
# each on a GPU: scripts/fashion_mnist_gpu.sh runs the 100-epoch seeds and the anchor runs
# at once on one GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-runs}" stage="${2:-all}"
case "$stage" in
  all | figures | seeds | anchor) ;;
  *)
    echo "error: STAGE is all, figures, seeds or anchor, not '$stage'." >&2
    exit 2
    ;;
esac

if [[ ! -d data/fashion_mnist/train10000 ]]; then
  python scripts/export_idx.py /usr/share/datasets/fashion-mnist data/fashion_mnist \
    --classes fashion_mnist --train_subset 10000
fi

train() {  # train CONFIG WORKDIR [--config.key=value ...]
  local config="$1" workdir="$2"
  shift 2
  if [[ -f "$workdir/eval_results.json" ]]; then
    echo "== $workdir finished before, skipped."
    return
  fi
  echo "== $workdir ($(date -u +%FT%TZ))"
  python -m resnet_jax.main --config "$config" --workdir "$workdir" "$@"
}

figures() {
  # Figure 6: plain against residual nets on the 10k-image subset, depth 20 first (13 min a
  # run on a 2-core EPYC), then figure 7 and the gradient norms from their checkpoints, so a
  # stop before depth 56 still leaves both figures at depth 20; then depth 56 (35-45 min a
  # run) and both analyses over all four runs.
  python -m resnet_jax.experiments.degradation --config configs/fashion_mnist.py:degradation \
    --workdir "$runs/degradation_fmnist" --depths 20
  python -m resnet_jax.experiments.layer_responses --workdir "$runs/degradation_fmnist" \
    --runs plain20,resnet20 --out "$runs/degradation_fmnist/layer_responses_20"
  python -m resnet_jax.experiments.degradation --config configs/fashion_mnist.py:degradation \
    --workdir "$runs/degradation_fmnist" --depths 20,56
  python -m resnet_jax.experiments.layer_responses --workdir "$runs/degradation_fmnist"
  # How the accuracy grows with the budget: ResNet-20, seed 0, 10 epochs.
  train configs/fashion_mnist.py "$runs/fmnist_resnet20_10ep_seed0" --config.num_epochs=10 --config.seed=0
  # The accuracy at the 30-epoch budget, three seeds.
  for seed in 0 1 2; do
    train configs/fashion_mnist.py "$runs/fmnist_resnet20_30ep_seed$seed" --config.seed="$seed"
  done
  # DenseNet-BC against the ResNets of the degradation runs: same subset, same recipe.
  train configs/fashion_mnist.py:degradation "$runs/degradation_fmnist/densenet40" \
    --config.model.name=densenet40
  python scripts/summarize_runs.py "$runs"/fmnist_resnet20_* --json_out "$runs/fmnist_accuracy.json"
  # Figure 6 at twice the budget (6,000 iterations, decays at 3,000 and 4,500): at 3,000
  # ResNet-56 ended above ResNet-20, against the paper. The ResNets first (the panel in
  # question; ResNet-56 takes about 3x ResNet-20's time), then the plain nets, then the
  # figure, figure 7 and the gradient norms of the four final checkpoints.
  for name in resnet20 resnet56 plain20 plain56; do
    train configs/fashion_mnist.py:degradation6000 "$runs/degradation_fmnist_6000/$name" \
      --config.model.name="$name"
  done
  python -m resnet_jax.experiments.degradation --config configs/fashion_mnist.py:degradation6000 \
    --workdir "$runs/degradation_fmnist_6000" --depths 20,56
  python -m resnet_jax.experiments.layer_responses --workdir "$runs/degradation_fmnist_6000"
  # The start-up test: the same 3,000-iteration ResNets with each residual branch's last
  # BatchNorm scale at zero, so that every block starts as the identity (the plain nets
  # have no branch to zero; the ResNet panel alone).
  python -m resnet_jax.experiments.degradation --config configs/fashion_mnist.py:degradation \
    --workdir "$runs/degradation_fmnist_zi" --depths 20,56 --kinds resnet \
    --config.model.zero_init_residual=True
  # The paper's remedy for a deep net's start (its ResNet-110 begins at lr 0.01): a linear
  # warm-up over the first 400 iterations, all four nets, the 3,000-iteration recipe (the
  # story figure: both panels in the paper's direction), figure 7 and the gradient norms
  # from their checkpoints; then the ResNets again with seed 1.
  python -m resnet_jax.experiments.degradation --config configs/fashion_mnist.py:degradation \
    --workdir "$runs/degradation_fmnist_warmup" --depths 20,56 --config.warmup_epochs=5.12
  python -m resnet_jax.experiments.layer_responses --workdir "$runs/degradation_fmnist_warmup" \
    --runs plain20,plain56,resnet20,resnet56
  python -m resnet_jax.experiments.degradation --config configs/fashion_mnist.py:degradation \
    --workdir "$runs/degradation_fmnist_warmup_seed1" --depths 20,56 --kinds resnet \
    --config.warmup_epochs=5.12 --config.seed=1
  # ResNet-110 with the same warm-up, beside the four (about 3x ResNet-56's time: 3-4 hours
  # on 2 cores); --depths 20,56,110 then draws the figure with it.
  train configs/fashion_mnist.py:degradation "$runs/degradation_fmnist_warmup/resnet110" \
    --config.model.name=resnet110 --config.warmup_epochs=5.12
  # ResNet-110 blew up as the warm-up's rate passed about 0.07 (steps 300-400). The chase:
  # the sharpness of the three ResNets at initialisation (the largest stable rate), then
  # ResNet-110 twice more: the linear warm-up with seed 1, and the paper's own start (lr
  # 0.01 held for 400 iterations, then 0.1); each about 5-6 hours on 2 cores, two at once.
  python -m resnet_jax.experiments.sharpness --workdir "$runs/degradation_fmnist_warmup" \
    --runs resnet20,resnet56,resnet110 --checkpoints init --batches 1 --tolerance 1e-2 \
    --out "$runs/degradation_fmnist_warmup/sharpness_init"
  train configs/fashion_mnist.py:degradation "$runs/degradation_fmnist_warmup_seed1/resnet110" \
    --config.model.name=resnet110 --config.warmup_epochs=5.12 --config.seed=1
  train configs/fashion_mnist.py:degradation "$runs/degradation_fmnist_paperwarmup/resnet110" \
    --config.model.name=resnet110 --config.warmup_epochs=5.12 --config.warmup_kind=constant
  python -m resnet_jax.experiments.sharpness --workdir "$runs/degradation_fmnist_paperwarmup" \
    --runs resnet110 --checkpoints 250 --batches 1 --tolerance 1e-2
  # ResNet-56 under the paper's start to step 450, a checkpoint every 50 steps, and its
  # sharpness before and after the jump to 0.1 (about 25 min); then ResNet-110 with every
  # residual branch starting at zero, beside the zero-init ResNet-20 and -56 (about 4 hours).
  train configs/fashion_mnist.py:degradation "$runs/paperwarmup_r56_450/resnet56" \
    --config.model.name=resnet56 --config.warmup_epochs=5.12 --config.warmup_kind=constant \
    --config.checkpoint_every_steps=50 --config.num_train_steps=450
  python -m resnet_jax.experiments.sharpness --workdir "$runs/paperwarmup_r56_450" \
    --runs resnet56 --checkpoints init,best,350,400,450 --batches 1 --tolerance 1e-2
  python -m resnet_jax.experiments.degradation --config configs/fashion_mnist.py:degradation \
    --workdir "$runs/degradation_fmnist_zi" --depths 20,56,110 --kinds resnet \
    --config.model.zero_init_residual=True
  python -m resnet_jax.experiments.sharpness --workdir "$runs/degradation_fmnist_zi" \
    --runs resnet110 --checkpoints init --batches 1 --tolerance 1e-2
}

seeds() {
  # ResNet-20 on all 60,000 images for 100 epochs with random erasing, three seeds (3.3 hours
  # each at 500 images/s; seed 0 took 6.0 hours at 330-370 images/s on a 2-core Xeon in
  # December 2026 and ended at 95.14%): the goal is the best 300-epoch anchor, 95.55%.
  python -m resnet_jax.experiments.recipes --config configs/fashion_mnist.py \
    --workdir "$runs/fmnist_100ep" --variants random_erasing --seeds 0,1,2 \
    --config.num_epochs=100 --config.ema_decay=0.999
}

anchor() {
  # The anchors' own recipe (configs/fashion_mnist.py:anchor): 300 epochs, an evaluation every
  # epoch, without and with random erasing, seed 0 (11 to 20 hours each on 2 cores); then
  # every final top-1 beside its best evaluation, the anchors' measure.
  train configs/fashion_mnist.py:anchor "$runs/fmnist_anchor/baseline_seed0"
  train configs/fashion_mnist.py:anchor "$runs/fmnist_anchor/random_erasing_seed0" \
    --config.random_erasing=0.5
  shopt -s nullglob  # The anchor stage alone: the 100-epoch seeds may not be there.
  python scripts/summarize_runs.py "$runs"/fmnist_100ep/*_seed* "$runs"/fmnist_anchor/*_seed* \
    --json_out "$runs/fmnist_anchor/summary.json"
}

for part in figures seeds anchor; do
  if [[ "$stage" == all || "$stage" == "$part" ]]; then
    "$part"
  fi
done
echo "== the runs of stage $stage finished ($(date -u +%FT%TZ))"
