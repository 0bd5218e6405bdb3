#!/usr/bin/env bash
# Serves TensorBoard on the workdir from worker 0, at http://localhost:6006 on this machine.
#
#   scripts/tpu_tensorboard.sh --name my-tpu --zone us-central2-b --workdir gs://BUCKET/resnet18
#
# The port is forwarded through the ssh session; Ctrl-C ends both. (With TensorFlow
# installed here, `tensorboard --logdir gs://BUCKET/resnet18` works locally too.)
# Settings: scripts/tpu_common.sh.

# shellcheck source-path=SCRIPTDIR source=tpu_common.sh
source "$(dirname "$0")/tpu_common.sh"
parse_flags "$@"
require TPU_NAME TPU_ZONE
require_gs_workdir
tpu_vm ssh --worker="${WORKER:-0}" \
  --command="cd $(quoted "$REMOTE_DIR") && .venv/bin/tensorboard --logdir $(quoted "$WORKDIR") --port 6006" \
  -- -L 6006:localhost:6006
