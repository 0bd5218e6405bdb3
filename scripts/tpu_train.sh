#!/usr/bin/env bash
# Starts training on every worker, detached, each logging to its own REMOTE_DIR/logs/train.log.
#
#   scripts/tpu_train.sh --name my-tpu --zone us-central2-b --workdir gs://BUCKET/resnet18 \
#       [--config configs/resnet18.py] [--data_dir gs://BUCKET/tfds] [-- --config.batch_size=256]
#
# The same `python -m resnet_jax.main ... --distributed` runs on every worker (jax finds
# the other workers of a pod slice by itself), under nohup and setsid: a dropped ssh
# session does not stop it. Rerunning it resumes from the workdir's latest checkpoint.
# Follow it with scripts/tpu_logs.sh. Settings: scripts/tpu_common.sh.

# shellcheck source-path=SCRIPTDIR source=tpu_common.sh
source "$(dirname "$0")/tpu_common.sh"
parse_flags "$@"
require TPU_NAME TPU_ZONE
require_gs_workdir
on_workers all "cd $(quoted "$REMOTE_DIR") && mkdir -p logs && nohup setsid $(main_command train) > logs/train.log 2>&1 < /dev/null &"
