#!/usr/bin/env bash
# Creates a Cloud TPU VM: a single host (v4-8, v5litepod-8) or a pod slice (v4-32, ...).
#
#   scripts/tpu_create.sh --name my-tpu --zone us-central2-b --type v4-8 [--spot]
#
# --spot asks for a Spot VM (cheaper, can be preempted: training saves and exits 143 on
# the SIGTERM, and scripts/tpu_train.sh continues it). Settings: scripts/tpu_common.sh.

# shellcheck source-path=SCRIPTDIR source=tpu_common.sh
source "$(dirname "$0")/tpu_common.sh"
parse_flags "$@"
require TPU_NAME TPU_ZONE
args=(--accelerator-type="$TPU_TYPE" --version="${TPU_VERSION:-$(default_version "$TPU_TYPE")}")
((SPOT)) && args+=(--spot)
tpu_vm create "${args[@]}"
