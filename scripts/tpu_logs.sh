#!/usr/bin/env bash
# Follows a worker's training log (default worker 0; --worker all shows every worker's).
#
#   scripts/tpu_logs.sh --name my-tpu --zone us-central2-b [--worker 1]
#
# Ctrl-C stops following, not the run. Settings: scripts/tpu_common.sh.

# shellcheck source-path=SCRIPTDIR source=tpu_common.sh
source "$(dirname "$0")/tpu_common.sh"
parse_flags "$@"
require TPU_NAME TPU_ZONE
on_workers "${WORKER:-0}" "tail -n 50 -F $(quoted "$REMOTE_DIR")/logs/train.log"
