#!/usr/bin/env bash
# Evaluates a checkpoint of the workdir on every worker together, and prints the result.
#
#   scripts/tpu_eval.sh --name my-tpu --zone us-central2-b --workdir gs://BUCKET/resnet18 \
#       [-- --config.eval_checkpoint=best]
#
# Writes WORKDIR/evaluations/step_<N>.json. Settings: scripts/tpu_common.sh.

# shellcheck source-path=SCRIPTDIR source=tpu_common.sh
source "$(dirname "$0")/tpu_common.sh"
parse_flags "$@"
require TPU_NAME TPU_ZONE
require_gs_workdir
on_workers all "cd $(quoted "$REMOTE_DIR") && $(main_command eval)"
